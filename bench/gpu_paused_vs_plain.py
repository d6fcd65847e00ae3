"""Is a paused call a plain call? Calls inside a paused capture against calls with no capture, in one process.

``bench/gpu_session_grid.py`` times recorded calls against paused calls of one capture session. A paused
call runs the model's own code (compiled decoding: transformers' own compiled call); since the capture
takes its hooks off the model for a paused batch, nothing of the capture should run in it (before, its
top-level hooks stayed on and ran eagerly around every forward, and eager decoding called the per-layer
hooks too). This benchmark measures what a paused call costs against no capture at all: pairs of one
call in a freshly opened capture, paused before its first call and closed after it, and one call with
no capture (order swapped every pair), each timed by the mean decode step (a stopping criterion stamps
each step in both arms). Opening and closing the capture are outside the timed call. A positive excess
means the grid's figures understate capture's cost against no capture by about that much.

    python bench/gpu_paused_vs_plain.py --model qwen3 --layers 12 --mode compiled --batch 1 --prompt 64 --pairs 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_step_profile as G  # noqa: E402
import moeprof  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3", choices=("qwen3", "deepseek"))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--mode", default="compiled", choices=("eager", "compiled"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=60, help="at most this many pairs")
    ap.add_argument("--budget", type=float, default=None, help="stop after this many seconds of pairs (at least 8 pairs)")
    args = ap.parse_args()
    compiled = args.mode == "compiled"
    model, inputs = G.model_and_inputs(args.model, args.layers, args.batch, args.prompt)
    scratch = tempfile.TemporaryDirectory(prefix="moeprof-paused-")  # removed at exit, however the run ends
    stamps, work = G.Stamps(), Path(scratch.name)

    def paused_call(i: int) -> float:
        rec = moeprof.capture(model, work / f"p{i}", force=True, eos_token_id=None).start()
        rec.pause()
        try:
            _, per_step = G.generate(model, inputs, args.new, compiled, stamps)
        finally:
            rec.close()
        if rec.rows:
            raise SystemExit(f"a paused capture recorded {rec.rows} rows")
        return float(per_step.mean())

    def plain_call(i: int) -> float:
        return float(G.generate(model, inputs, args.new, compiled, stamps)[1].mean())

    for i in range(2):  # both arms warm (the model's own compiled code, its CUDA graphs)
        plain_call(i), paused_call(-1 - i)
    logs, means, t0 = [], {"paused": [], "plain": []}, time.monotonic()
    for i in range(args.pairs):
        if args.budget is not None and i >= 8 and time.monotonic() - t0 > args.budget:
            break
        pair = {}
        for arm in ("paused", "plain") if i % 2 == 0 else ("plain", "paused"):
            pair[arm] = paused_call(i) if arm == "paused" else plain_call(i)
            means[arm].append(pair[arm])
        logs.append(np.log(pair["paused"] / pair["plain"]))
    excess, lo, hi = G.t_interval(logs)
    print(f"{args.model} L{args.layers} {args.mode} batch {args.batch} prompt {args.prompt} new {args.new}: {len(logs)} pairs, "
          f"mean decode step µs: paused {np.median(means['paused']):.1f}, plain {np.median(means['plain']):.1f} (medians)")
    print(f"  paused against no capture, mean decode step: {100 * excess:+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]", flush=True)


if __name__ == "__main__":
    main()
