"""Compiled decoding on a GPU (static cache + torch.compile, CUDA graphs): does a capture that stacks
decode steps into block buffers record the same values as one that gathers every step on its own?

    python bench/gpu_block_values.py

Four captures of the same greedy generation (Qwen3 shape, 12 layers, batch 1, prompt 64, two
generate() calls each), alternating the two ways; prints their row counts and whether their routing
values (bench/gpu_grid.py's columns) are equal, pairwise and between two captures made the same way.
"""
import sys
import tempfile
from pathlib import Path
import torch
sys.path.insert(0, "bench")
from gpu_capture import build, generate_once
from gpu_grid import routing_values
import moeprof

model = build("qwen3", 12, None)
for b in (1,):
    ids = torch.randint(10, 1000, (b, 64), generator=torch.Generator().manual_seed(b)).cuda()
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    generate_once(model, inputs, 64, True)
    tabs = []
    with tempfile.TemporaryDirectory() as d:
        for defer in (False, True, False, True):
            rec = moeprof.capture(model, Path(d) / f"t{len(tabs)}", force=True, eos_token_id=None).start()
            rec._pipe._defer = defer
            try:
                generate_once(model, inputs, 64, True)
                generate_once(model, inputs, 64, True)
            finally:
                rec.close()
            tabs.append(routing_values(Path(d) / f"t{len(tabs)}"))
    print(f"compiled batch {b}: rows {[t.num_rows for t in tabs]}; blocks == per-step: {tabs[1].equals(tabs[0])}, "
          f"{tabs[3].equals(tabs[2])}; per-step == per-step: {tabs[2].equals(tabs[0])}", flush=True)
