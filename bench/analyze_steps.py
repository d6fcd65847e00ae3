"""Where `moeprof analyze` spends its time: each step's wall and CPU seconds in one run.

    python bench/analyze_steps.py bench/out/trace-1000000      # a trace written by bench/analyze_bench.py

Wraps the steps of :func:`moeprof.analysis.run.analyze_trace` (the counting pass, the token matrix,
batch imbalance and its bootstrap, co-activation, classification, prefill->decode, ...) with timers
and prints, per step, its wall seconds and the CPU seconds of the thread that ran it (of the whole
process for the counting pass, which runs alone on threads of its own), then the
imports and the writing of the outputs. Steps run side by side on the statistics' thread pool, so
their wall times overlap and each thread's CPU includes what sharing the cores costs it.
Prefill->decode counts its blocks of requests on threads of its own, so its line holds little: its
sorts, Spearman ranks and unit vectors are timed call by call on those threads (summed over them).
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from pathlib import Path

t0 = time.perf_counter()
import numpy  # noqa: E402,F401
import polars  # noqa: E402,F401

t1 = time.perf_counter()
from moeprof.analysis import aggregate, coactivation, domain, load, phase, run  # noqa: E402

t2 = time.perf_counter()

STEPS = [
    (run, "aggregate_routing", "counting pass (read, verify, count, sample)"),
    (load, "token_matrix", "token matrix of the sample"),
    (load, "batch_imbalance", "batch imbalance"),
    (load, "window_stragglers", "  counts per batch (and their max / mean)"),
    (load, "_bootstraps", "  bootstrap (20 x 1000 resamples)"),
    (run, "_coactivation", "co-activation"),
    (coactivation, "counts", "  load, pair and transition counts"),
    (coactivation, "pair_table", "  pair table"),
    (coactivation, "transition_table", "  transition table"),
    (run, "_classification", "classification"),
    (run, "_prefill_decode", "prefill -> decode"),
    # its blocks of requests run on threads of their own: their sorts, ranks and unit vectors, timed per call
    (phase, "order_desc", "  sorts (its threads)"),
    (phase, "unit_ranks", "  Spearman ranks (its threads)"),
    (phase, "_unit", "  unit vectors (its threads)"),
    (domain, "pairwise_shift", "domain shift"),
    (load, "layer_imbalance", "whole-trace imbalance"),
    (run, "build_selection", "selection (requests, layers)"),
]
times: dict[str, list[tuple[float, float]]] = {}


def _timed(module, name: str, label: str) -> None:
    fn = getattr(module, name)

    # The counting pass runs alone but on threads of its own (row groups, or slices of one): the process's CPU.
    clock = time.process_time if name == "aggregate_routing" else time.thread_time

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        w, c = time.perf_counter(), clock()
        try:
            return fn(*args, **kwargs)
        finally:
            times.setdefault(label, []).append((time.perf_counter() - w, clock() - c))

    setattr(module, name, wrapper)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for module, name, label in STEPS:
        _timed(module, name, label)
    with tempfile.TemporaryDirectory() as tmp:
        w, c = time.perf_counter(), time.process_time()
        a = run.analyze_trace(sys.argv[1])
        w_an, c_an = time.perf_counter() - w, time.process_time() - c
        w, c = time.perf_counter(), time.process_time()
        out = Path(tmp) / "analysis"
        out.mkdir()
        run.write_outputs(a, out)
        w_out, c_out = time.perf_counter() - w, time.process_time() - c
    rows = a.summary["trace"]["routing_rows"]
    print(f"{rows:,} routing rows; imports: numpy + polars {t1 - t0:.2f} s, moeprof.analysis {t2 - t1:.2f} s")
    print(f"{'step':46s} {'wall s':>7s} {'CPU s':>7s}")
    print(f"{'analyze_trace (all steps, every thread)':46s} {w_an:7.2f} {c_an:7.2f}")
    for _, _, label in STEPS:
        if label in times:
            print(f"{label:46s} {sum(x[0] for x in times[label]):7.2f} {sum(x[1] for x in times[label]):7.2f}")
    print(f"{'write summary + tables (every thread)':46s} {w_out:7.2f} {c_out:7.2f}")
    big = {n: df.height for n, df in a.tables.items() if df.height > 100_000}
    print("large tables: " + ", ".join(f"{n} {h:,} rows" for n, h in big.items()))


if __name__ == "__main__":
    main()
