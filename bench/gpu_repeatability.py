"""Is a GPU capture's value check meaningful at this shape? Captures the same greedy generation several
ways and compares each trace, row for row, with a first capture that gathered every step as it ended.

    python bench/gpu_repeatability.py 32 2048     # batch, prompt (Qwen3 shape, 12 layers, 32 new tokens)

Prints, per capture, whether it equals the reference and, where not, how many rows differ per column
and whether any is a prefill row. Two captures made the same way ("nodefer" against the reference)
differing as well means the model's own decoding does not repeat bit for bit at this shape.
"""
import sys
import tempfile
from pathlib import Path
import numpy as np
import torch
sys.path.insert(0, "bench")
from gpu_capture import build, generate_once
from gpu_grid import routing_values
import moeprof

model = build("qwen3", 12, None)
b, p = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(b * 10007 + p)
ids = torch.randint(10, model.config.vocab_size, (b, p), generator=g).cuda()
inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
generate_once(model, inputs, 32, False)

def run(out, defer, big):
    rec = moeprof.capture(model, out, force=True, eos_token_id=None).start()
    rec._pipe._defer = defer
    if big: rec._pipe._big_bytes = big
    try:
        generate_once(model, inputs, 32, False)
    finally:
        rec.close()
    return routing_values(out)

with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    ref = run(d / "ref", False, None)
    for name, defer, big in [("nodefer", False, None), ("defer", True, None), ("defer-noworker", True, 1 << 40),
                             ("nodefer-noworker", False, 1 << 40), ("defer2", True, None), ("nodefer-noworker2", False, 1 << 40)]:
        t = run(d / name, defer, big)
        same = t.equals(ref)
        msg = f"{name}: rows {t.num_rows} vs {ref.num_rows}, equal {same}"
        if not same and t.num_rows == ref.num_rows:
            step = ref.column("step").to_numpy()
            for col in ["request_id", "step", "layer", "pos", "token_id", "experts", "weights"]:
                a, c = ref.column(col), t.column(col)
                if a.equals(c): continue
                if col in ("experts", "weights"):
                    x = np.stack(a.to_numpy(zero_copy_only=False)); y = np.stack(c.to_numpy(zero_copy_only=False))
                    diff = (x != y).any(axis=1)
                else:
                    diff = a.to_numpy(zero_copy_only=False) != c.to_numpy(zero_copy_only=False)
                msg += f"\n   {col}: {int(diff.sum())} rows differ, prefill rows {int((diff & (step == 0)).sum())}, first at {int(np.argmax(diff))}"
        print(msg, flush=True)
