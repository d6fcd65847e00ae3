"""Diagnose compiled decoding with capture: graph breaks, recompiles and CUDA-graph skips.

    python bench/gpu_compile_diag.py --layers 4 --batch 64 --new-tokens 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moeprof  # noqa: E402
from gpu_capture import build, generate_once  # noqa: E402


def counters_snapshot():
    from torch._dynamo.utils import counters

    return {k: dict(v) for k, v in counters.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    model = build("qwen3", args.layers, None)
    ids = torch.randint(10, 1000, (args.batch, 256)).cuda()
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    from torch._dynamo.utils import counters

    for arm in ("plain", "capture", "capture", "plain"):
        counters.clear()
        t = time.perf_counter()
        if arm == "plain":
            generate_once(model, inputs, args.new_tokens, True)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                with moeprof.capture(model, Path(tmp) / "t", eos_token_id=None):
                    generate_once(model, inputs, args.new_tokens, True)
        print(f"{arm}: {time.perf_counter() - t:.2f} s", counters_snapshot(), flush=True)
    # Where does a compiled decode step spend its time, with and without capture?
    from torch.profiler import ProfilerActivity, profile

    for arm in ("plain", "capture"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            if arm == "plain":
                generate_once(model, inputs, 8, True)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    with moeprof.capture(model, Path(tmp) / "t", eos_token_id=None):
                        generate_once(model, inputs, 8, True)
        print(f"== {arm}: top CPU self time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
        print(f"== {arm}: top CUDA self time")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=60))


if __name__ == "__main__":
    main()
