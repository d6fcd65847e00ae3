"""What a paused capture costs each compiled decode step: transformers' own compiled call with and without the capture.

A paused batch runs with no hook of the capture on the model (taken off when it starts, put back on
resume); before that change the capture's top-level hooks stayed on, and transformers' compiled call ran
``Module.__call__`` (and so those hooks) eagerly under dynamo's frame hook. This benchmark takes one
real decode step of a small Qwen3-MoE (built from its config, compiled decoding with a static cache,
``aot_eager`` on CPU) and times transformers' compiled call on that step's arguments in a tight loop:
with no capture, and inside a paused capture, rounds alternating in one process. The difference is
what pausing costs a step (and what ``bench/gpu_session_grid.py``'s paused arm pays over a plain call).
The frames dynamo compiled for the capture's code are counted.

    python bench/capture_paused_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an older tree can be timed
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moeprof  # noqa: E402
from capture_guard_cost import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6, help="rounds per arm, alternating")
    ap.add_argument("--calls", type=int, default=300, help="timed calls per round")
    args = ap.parse_args()
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    print(f"moeprof from {Path(moeprof.__file__).parent}", flush=True)
    model = build(args.layers)
    ids = torch.randint(10, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    cc = CompileConfig(backend="aot_eager", fullgraph=False, mode=None)
    cc._compile_all_devices = True
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=0, cache_implementation="static", compile_config=cc)
    seen = []
    grab = model.register_forward_pre_hook(lambda m, a, k: seen.append({n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in k.items()}), with_kwargs=True)
    model.generate(**kw)
    grab.remove()
    step = seen[1]  # the first decode step's arguments
    lengths = [layer.cumulative_length for layer in step["cache"].layers]  # a static cache's write positions
    at = int(step["position_ids"].reshape(-1)[0])
    compiled = model.get_compiled_call(cc)  # transformers' own compiled call

    def call() -> None:
        for n in lengths:  # the step again, at its own position (in place: the addresses are static)
            n.fill_(at)
        compiled(**step)

    def timed() -> float:
        with torch.no_grad():
            for _ in range(20):
                call()
            t0 = time.perf_counter_ns()
            for _ in range(args.calls):
                call()
        return (time.perf_counter_ns() - t0) / args.calls / 1e3

    scratch = tempfile.TemporaryDirectory(prefix="moeprof-paused-")  # removed at exit, however the run ends
    rec = moeprof.capture(model, Path(scratch.name) / "t", force=True, eos_token_id=None)
    frames_before = counters["frames"]["total"]
    us = {"no capture": [], "paused capture": []}
    for r in range(args.rounds):
        for arm in ("no capture", "paused capture") if r % 2 == 0 else ("paused capture", "no capture"):
            if arm == "paused capture":
                rec.start()
                rec.pause()
                model.generate(**kw)  # a paused batch: its decode steps are the ones timed
                us[arm].append(timed())
                rec.close()
                rec = moeprof.capture(model, rec.out.parent / f"t{r}", force=True, eos_token_id=None)
            else:
                us[arm].append(timed())
    frames = counters["frames"]["total"] - frames_before
    plain, paused = statistics.median(us["no capture"]), statistics.median(us["paused capture"])
    for arm, v in us.items():
        print(f"  {arm:15s} " + " ".join(f"{x:8.1f}" for x in v) + " µs a call")
    diffs = [b - a for a, b in zip(us["no capture"], us["paused capture"])]  # round by round
    half = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    mean = statistics.fmean(diffs)
    print(f"Qwen3-MoE, {args.layers} layers, transformers' compiled decode call: {plain:.1f} µs with no capture, "
          f"{paused:.1f} µs in a paused capture (medians); paused minus none, round by round: {mean:+.1f} µs a step "
          f"[{mean - half:+.1f}, {mean + half:+.1f}]; frames dynamo compiled while paused: {frames}")


if __name__ == "__main__":
    main()
