"""Does capture change what the model computes? Logits of the same greedy generation with and without
a capture running, eager and compiled (static cache, torch.compile, CUDA graphs), on a GPU.

    python bench/gpu_capture_unchanged.py [BATCHES [eager|compiled [qwen3|deepseek]]]   # default: 1,8, both, qwen3 (12 layers)

Eager, the hooks only read the routing: logits must be bit for bit those of a plain run. Compiled, the
hooks are traced into the graph, and a graph with more outputs may be fused and rounded differently;
this prints how far the logits of a second compilation of the plain model are (the control: compiling
is not bit for bit repeatable), and of a capture (ids and weights, or expert ids only: ``weights=False``)
from a plain compiled run, and how often the greedy tokens differ.
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, "bench")
from gpu_capture import build  # noqa: E402

import moeprof  # noqa: E402

MODEL = (sys.argv[3] if len(sys.argv) > 3 else "qwen3")
model = build(MODEL, 12 if MODEL == "qwen3" else 3, None)
from transformers.generation.configuration_utils import CompileConfig  # noqa: E402

for b in [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "1,8").split(",")]:
    ids = torch.randint(10, 1000, (b, 64), generator=torch.Generator().manual_seed(b)).cuda()
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    for compiled in (False, True) if len(sys.argv) < 3 else (sys.argv[2] == "compiled",):
        kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
        if compiled:
            kw.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=False, mode="reduce-overhead"))

        def run():
            out = model.generate(**inputs, **kw)
            return out.sequences.cpu(), torch.stack(out.logits).float().cpu()

        run()
        plain = run()
        arms = {"plain again": None, "plain, compiled anew": "reset", "capture": True, "capture, ids only": False}
        if not compiled:
            arms.pop("plain, compiled anew")
        line = []
        with tempfile.TemporaryDirectory() as d:
            for name, arm in arms.items():
                if arm is None:
                    got = run()
                elif arm == "reset":  # the control: how far two compilations of the same plain model are apart
                    torch._dynamo.reset()
                    run()
                    got = run()
                else:
                    with moeprof.capture(model, Path(d) / name, force=True, eos_token_id=None, weights=arm):
                        run()  # capture drops older compiled code: this call traces and compiles
                        got = run()
                if compiled:
                    run()  # after a capture the next plain call recompiles
                same = torch.equal(got[1], plain[1])
                diff = (got[1] - plain[1]).abs().max().item()
                tokens = (got[0] != plain[0]).sum().item()
                line.append(f"{name}: logits equal {same} (max |diff| {diff:.3g}), tokens differing {tokens}")
        print(f"{MODEL} batch {b}, {'compiled' if compiled else 'eager'}: " + "; ".join(line), flush=True)
