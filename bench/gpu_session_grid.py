"""Capture overhead over a grid of batch x prompt points, each timed recorded against paused calls in one session.

For each point (``--points``, batch x prompt) one warm capture session alternates recorded and paused
``generate()`` calls (``bench/gpu_step_profile.py --within-session``), pairs until ``--budget``
seconds are spent (at least ``--min-pairs``, at most ``--max-pairs``), and reports the capture's
excess on the mean decode step and on the whole call with a 95% t-interval over pairs. The model is
built once per run. Then the session's trace is checked row for row: every recorded call must hold
``batch x (prompt + new - 1) x MoE layers`` rows, and each call's experts are compared with the first
call's (same prompts, greedy decoding: any difference is either a capture error or the model's own
non-determinism, which the line reports as a count, not a verdict).

    python bench/gpu_session_grid.py --model qwen3 --layers 12 --mode compiled --points 1x512,8x512,32x64
    python bench/gpu_session_grid.py --model deepseek --layers 3 --mode eager --points 32x64,128x64 --budget 60

Prints one line per point as it ends and a table at the end; ``--out DIR`` writes each point's JSON.
Points that do not fit in GPU memory are reported as such and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an older tree can be timed
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_step_profile as G  # noqa: E402
import moeprof  # noqa: E402


def check_rows(path: Path, batch: int, prompt: int, new: int) -> str:
    """The session's rows per recorded call, and how many rows' experts differ from the first call's."""
    t = ds.dataset(path / "routing", format="parquet").to_table(columns=["request_id", "step", "pos", "layer", "experts"])
    t = t.take(pc.sort_indices(t, [(k, "ascending") for k in ("request_id", "step", "layer", "pos")]))
    req = t["request_id"].to_numpy()
    calls = (req - req.min()) // batch
    n_calls = int(calls.max()) + 1
    per_call = np.bincount(calls, minlength=n_calls)
    layers = len(pc.unique(t["layer"]))  # the MoE layers (the DeepSeek-V3 shape's first layer is dense)
    want = batch * (prompt + new - 1) * layers
    experts = np.asarray(t["experts"].combine_chunks().flatten().to_numpy()).reshape(t.num_rows, -1)
    same_size = [c for c in range(1, n_calls) if per_call[c] == per_call[0]]
    # each call against the first and against the one before it: a first call that differs from all the
    # others (traced, its graphs recorded) shows as many rows against the first and none against the previous
    first = experts[calls == 0]
    to_first = [int((experts[calls == c] != first).any(axis=1).sum()) for c in same_size]
    to_prev = [int((experts[calls == c] != experts[calls == c - 1]).any(axis=1).sum()) for c in same_size
               if per_call[c - 1] == per_call[c]]
    ok = "as expected" if (per_call == want).all() else f"EXPECTED {want}: {sorted(set(per_call.tolist()))}"
    return (f"{n_calls} recorded calls of {per_call[0]:,} rows ({ok}); rows whose experts differ from the first "
            f"call's: {sum(to_first):,} of {int(per_call[same_size].sum()):,} (calls with any: "
            f"{sum(d > 0 for d in to_first)}); from the call before: {sum(to_prev):,} (calls with any: "
            f"{sum(d > 0 for d in to_prev)})")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="qwen3", choices=("qwen3", "deepseek"))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--mode", default="compiled", choices=("eager", "compiled"))
    ap.add_argument("--points", default="1x64,8x64,32x64", help="batch x prompt, comma-separated")
    ap.add_argument("--new", type=int, default=64, help="new tokens per generate() (default 64)")
    ap.add_argument("--budget", type=float, default=45, help="seconds of timed pairs per point (default 45)")
    ap.add_argument("--min-pairs", type=int, default=6)
    ap.add_argument("--max-pairs", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None, help="a directory for one JSON per point")
    args = ap.parse_args()
    print(f"moeprof from {Path(moeprof.__file__).parent}; {torch.cuda.get_device_name()}, torch {torch.__version__}",
          flush=True)
    from gpu_capture import build

    compiled = args.mode == "compiled"
    model = build(args.model, args.layers, "grouped_mm" if args.model == "deepseek" else None)
    stamps, work = G.Stamps(), Path(tempfile.mkdtemp(prefix="moeprof-grid-"))
    rows = []
    for point in args.points.split(","):
        batch, prompt = (int(x) for x in point.lower().split("x"))
        g = torch.Generator(device="cpu").manual_seed(batch * 10007 + prompt)
        ids = torch.randint(10, model.config.vocab_size, (batch, prompt), generator=g).cuda()
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        run = argparse.Namespace(model=args.model, layers=args.layers, mode=args.mode, batch=batch, prompt=prompt,
                                 new=args.new, within_session=args.max_pairs, budget=args.budget,
                                 min_pairs=args.min_pairs,
                                 out=args.out / f"{args.model}_{args.mode}_b{batch}_p{prompt}.json" if args.out else None)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            for _ in range(2):
                G.generate(model, inputs, args.new, compiled, stamps)
            result = G.within_session(run, model, inputs, compiled, 2 if compiled else 0, stamps, work)
            check = check_rows(work / "session", batch, prompt, args.new)
        except torch.OutOfMemoryError:
            print(f"{point}: out of GPU memory", flush=True)
            rows.append((point, None, "out of GPU memory"))
            torch.cuda.empty_cache()
            continue
        print(f"  {check}; {time.monotonic() - t0:.0f} s", flush=True)
        if run.out:
            data = json.loads(run.out.read_text())
            data["row_check"] = check
            run.out.write_text(json.dumps(data))
        rows.append((point, result, check))
        del inputs
        torch.cuda.empty_cache()
    print(f"\n{args.model} L{args.layers} {args.mode}, {args.new} new tokens: recorded against paused in one session")
    print(f"{'batch x prompt':>14}  {'pairs':>5}  {'mean decode step excess [95%]':>32}  {'whole call':>10}  <=1%   ±0.5%")
    for point, r, check in rows:
        if r is None:
            print(f"{point:>14}  {check}")
            continue
        m, lo, hi = (100 * x for x in r["step_excess"])
        meets = "yes" if hi <= 1 else "no" if lo > 1 else "?"
        narrow = "yes" if (hi - lo) / 2 <= 0.5 else "no"
        print(f"{point:>14}  {r['pairs']:>5}  {m:+8.2f}% [{lo:+6.2f}, {hi:+6.2f}]          {100 * r['call_excess'][0]:+8.2f}%"
              f"  {meets:<5}  {narrow}")


if __name__ == "__main__":
    main()
