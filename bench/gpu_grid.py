"""Capture overhead on a GPU over a grid of batch sizes and prompt lengths, with 95% intervals (issue 18).

For each point (batch, prompt) it times ``generate()`` with and without ``moeprof.capture`` in pairs
run back to back, alternating which arm goes first, and keeps adding pairs until the 95% interval of
the overhead is narrower than ±``--target`` (default 0.5%) or the point's time budget is spent. The
overhead of a pair is ``capture / plain``, where the capture arm times
generate() plus the host processing of the steps still pending at its end (a longer capture does that
while running) and opening and closing the trace (a fixed cost per capture, not per step) is
reported apart; a pair whose timed calls recorded CUDA graphs or compiled (:class:`GraphWork`) is
counted, and the overhead is also given without such pairs; the interval is a t-interval of the mean log ratio over
pairs (pairing cancels the slow drift of a shared GPU that unpaired medians cannot). Every capture
run's trace is checked: its number of rows against the rows generate() must produce, and its
routing values (request, step, layer, position, experts, weights, token), row for row, against a
reference capture of the same generation in which every step was gathered and copied as it ended
(no deferred steps), the weights to within a printed difference (compiled decoding records the
weights its own graph computes, and two graphs may round them differently). That check is exact only where the model's own decoding repeats bit for bit:
at long prompts on a GPU two captures of the same generation made the same way can differ (near-tied
router scores flip, then the generated tokens), so a difference there says nothing about capture.

    python bench/gpu_grid.py --model qwen3 --layers 12 --batches 1,8,32,128 --prompts 64,512,2048 --mode eager
    python bench/gpu_grid.py --model qwen3 --layers 12 --batches 1,32 --prompts 64,512 --mode compiled

Prints one line per point and writes a JSON (``--out``). Models are built from transformers config
classes with random bf16 weights at real dimensions (``bench/gpu_capture.py``); routers get a
realistic spread so top-k is not a tie-break.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an older tree can be timed
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moeprof  # noqa: E402
from gpu_capture import GraphWork, build, generate_once  # noqa: E402

# two-sided 95% t quantiles, by degrees of freedom
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
        12: 2.18, 15: 2.13, 20: 2.09, 25: 2.06, 30: 2.04, 40: 2.02, 60: 2.00, 120: 1.98}


def t95(df: int) -> float:
    keys = sorted(k for k in _T95 if k <= df)
    return _T95[keys[-1]] if keys else _T95[1]


def interval(logs: list[float]) -> tuple[float, float, float]:
    """(ratio, low, high) from per-pair log ratios."""
    m = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(m), float("nan"), float("nan")
    h = t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(m), math.exp(m - h), math.exp(m + h)


def rows_in(out: Path) -> int:
    manifest = json.loads((out / "manifest.json").read_text())
    return sum(s["rows"] for s in manifest["shards"] if s["kind"] == "routing")


VALUE_COLUMNS = ["request_id", "step", "layer", "pos", "experts", "weights", "token_id"]


def routing_values(out: Path):
    """The trace's routing rows, value columns only, in file order (pyarrow: the GPU machine has no polars)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = json.loads((out / "manifest.json").read_text())
    tables = [pq.read_table(out / s["path"], columns=VALUE_COLUMNS) for s in manifest["shards"] if s["kind"] == "routing"]
    return pa.concat_tables(tables)


def compare(got, reference) -> tuple[bool, float]:
    """(every column but the weights equal, the largest weight difference). Compiled decoding records
    the weights its own graph computes: two graphs that fuse the router differently round them
    differently in the last bits (an in-graph ring tried on an H200: up to 1e-5 in float32)."""
    import numpy as np

    if got.num_rows != reference.num_rows:
        return False, float("inf")
    keys = [c for c in VALUE_COLUMNS if c != "weights"]
    exact = got.select(keys).equals(reference.select(keys))
    w_got, w_ref = got["weights"].combine_chunks(), reference["weights"].combine_chunks()
    if w_got.null_count or w_ref.null_count or not len(w_got):
        return exact and got["weights"].equals(reference["weights"]), 0.0
    a = np.asarray(w_got.flatten().to_numpy(zero_copy_only=False), np.float64)
    b = np.asarray(w_ref.flatten().to_numpy(zero_copy_only=False), np.float64)
    return exact, float(np.abs(a - b).max())


GRAPH_WORK: GraphWork | None = None


def point(model, batch, prompt, new, compiled, target, budget, min_pairs, max_pairs, workdir, untimed=None) -> dict:
    g = torch.Generator(device="cpu").manual_seed(batch * 10007 + prompt)
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt), generator=g).cuda()
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    n_moe = None
    # Compiled: a capture session's first call re-traces with the hooks, and its second still records
    # the CUDA graphs anew (a CUDAGraphNode.record, 5-7 cudaMallocs, 7 device syncs, 4-7 ms on an H200,
    # found with torch.profiler); the third call is the steady state of a long capture. Every call is
    # recorded. ``--untimed`` sets how many calls come first (default 2 compiled, 0 eager).
    warm_calls = untimed if untimed is not None else (2 if compiled else 0)
    calls = warm_calls + 1

    fixed: list[float] = []
    work: dict[str, int] = {}  # graphs recorded or compiled during each arm's timed call of a pair

    def captured_run(out: Path) -> float:
        """Seconds of the recorded generate() plus the host processing of its last steps, which a
        long capture would do while running; opening and closing the trace is timed apart (``fixed``)."""
        t0 = time.perf_counter()
        rec = moeprof.capture(model, out, force=True, eos_token_id=None).start()
        opened = time.perf_counter() - t0
        try:
            for _ in range(warm_calls):
                generate_once(model, inputs, new, compiled)
            before = GRAPH_WORK.mark()
            seconds = generate_once(model, inputs, new, compiled)
            work["capture"] = GRAPH_WORK.mark() - before
            t1 = time.perf_counter()
            rec._pipe.drain()  # the steps still pending: processed inside a longer run
            seconds += time.perf_counter() - t1
        finally:
            t2 = time.perf_counter()
            rec.close()
            fixed.append(opened + time.perf_counter() - t2)
        return seconds

    # Warm-up: both arms, so compilation and allocator growth are not timed. The reference capture
    # gathers every step as it ends (no deferred steps): every timed capture must give its values.
    generate_once(model, inputs, new, compiled)
    captured_run(workdir / "warm")
    rec = moeprof.capture(model, workdir / "reference", force=True, eos_token_id=None).start()
    if hasattr(rec._pipe, "_defer"):
        rec._pipe._defer = False
    try:
        for _ in range(calls):
            generate_once(model, inputs, new, compiled)
    finally:
        rec.close()
    reference = routing_values(workdir / "reference")
    n_moe = len(json.loads((workdir / "warm" / "manifest.json").read_text())["model"]["moe_layers"])
    expected = n_moe * batch * (prompt + new - 1) * calls
    plain, cap, logs, bad_rows, bad_values, weight_diff = [], [], [], 0, 0, 0.0
    recorded: list[int] = []  # pairs whose timed calls recorded or compiled graphs
    started = time.perf_counter()
    i = 0
    while True:
        pair = {}
        for arm in ("plain", "capture") if i % 2 == 0 else ("capture", "plain"):
            if arm == "plain":
                for _ in range(warm_calls):  # the same untimed calls as the capture arm
                    generate_once(model, inputs, new, compiled)
                before = GRAPH_WORK.mark()
                pair[arm] = generate_once(model, inputs, new, compiled)
                work["plain"] = GRAPH_WORK.mark() - before
            else:
                out = workdir / f"run{i % 2}"
                pair[arm] = captured_run(out)
                bad_rows += rows_in(out) != expected
                got = routing_values(out)
                exact, diff = compare(got, reference)
                bad_values += not exact
                weight_diff = max(weight_diff, diff)
        plain.append(pair["plain"])
        cap.append(pair["capture"])
        logs.append(math.log(pair["capture"] / pair["plain"]))
        if work["plain"] or work["capture"]:
            recorded.append(i)
        i += 1
        ratio, lo, hi = interval(logs)
        spent = time.perf_counter() - started
        if i >= min_pairs and (hi - lo) / 2 < target:
            break
        if i >= max_pairs or (i >= min_pairs and spent > budget):
            break
    ratio, lo, hi = interval(logs)
    quiet = [x for j, x in enumerate(logs) if j not in set(recorded)]
    q_ratio, q_lo, q_hi = interval(quiet) if quiet else (float("nan"),) * 3
    return {
        "batch": batch, "prompt": prompt, "new_tokens": new, "pairs": i, "untimed_calls": warm_calls,
        "overhead": ratio - 1, "ci95": [lo - 1, hi - 1], "half_width": (hi - lo) / 2,
        "target_met": (hi - lo) / 2 < target,
        "seconds_plain_median": statistics.median(plain), "seconds_capture_median": statistics.median(cap),
        "tokens_per_s_plain": batch * new / statistics.median(plain),
        "rows_expected_per_run": expected, "runs_with_wrong_rows": bad_rows,
        "runs_with_wrong_values": bad_values, "reference_rows": reference.num_rows,
        "weights_max_abs_diff": weight_diff,
        "open_close_seconds_median": statistics.median(fixed),
        "pairs_with_graph_work": len(recorded),
        "overhead_without_graph_work": q_ratio - 1, "ci95_without_graph_work": [q_lo - 1, q_hi - 1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["qwen3", "deepseek"], default="qwen3")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--prompts", default="64,512,2048")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    ap.add_argument("--target", type=float, default=0.005, help="half-width of the 95%% interval to reach")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of timed pairs per point at most")
    ap.add_argument("--min-pairs", type=int, default=6)
    ap.add_argument("--max-pairs", type=int, default=200)
    ap.add_argument("--untimed", type=int, default=None,
                    help="generate() calls of each arm before the timed one (default: 2 compiled, 0 eager)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_grid.py needs a CUDA GPU")
    import transformers

    global GRAPH_WORK
    GRAPH_WORK = GraphWork()
    impl = "grouped_mm" if args.model == "deepseek" else None
    model = build(args.model, args.layers, impl)
    print(f"moeprof from {Path(moeprof.__file__).parent}", flush=True)
    results = []
    out = Path(args.out or Path(__file__).parent / "results" / f"gpu_grid-{args.model}-{args.mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model, "layers": args.layers, "mode": args.mode, "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "target_half_width": args.target, "untimed_calls": args.untimed, "results": results,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for b in (int(x) for x in args.batches.split(",")):
            for p in (int(x) for x in args.prompts.split(",")):
                try:
                    r = point(model, b, p, args.new_tokens, args.mode == "compiled", args.target, args.budget,
                              args.min_pairs, args.max_pairs, Path(tmp) / f"b{b}p{p}", args.untimed)
                except torch.OutOfMemoryError:
                    r = {"batch": b, "prompt": p, "error": "out of GPU memory"}
                    torch.cuda.empty_cache()
                results.append(r)
                out.write_text(json.dumps(report, indent=2) + "\n")  # after every point: a cut-off run keeps them
                if "error" in r:
                    print(f"{args.model} {args.mode} batch {b:>3} prompt {p:>4}: {r['error']}", flush=True)
                    continue
                print(
                    f"{args.model} x{args.layers} {args.mode} batch {b:>3} prompt {p:>4}: overhead "
                    f"{100 * r['overhead']:+.2f}% [95% {100 * r['ci95'][0]:+.2f}%, {100 * r['ci95'][1]:+.2f}%] "
                    f"over {r['pairs']} pairs, {r['tokens_per_s_plain']:.0f} tok/s plain, "
                    f"wrong-row runs {r['runs_with_wrong_rows']}, runs differing from the per-step reference {r['runs_with_wrong_values']}"
                    f" (weights within {r['weights_max_abs_diff']:.1e})"
                    f"; opening + closing the trace "
                    f"{1000 * r['open_close_seconds_median']:.0f} ms; "
                    f"{r['pairs_with_graph_work']} pairs recorded or compiled graphs in a timed call, without them "
                    f"{100 * r['overhead_without_graph_work']:+.2f}% [{100 * r['ci95_without_graph_work'][0]:+.2f}%, "
                    f"{100 * r['ci95_without_graph_work'][1]:+.2f}%]",
                    flush=True,
                )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
