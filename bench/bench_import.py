"""Import throughput and peak memory: per-token JSONL and Megatron router trace of N rows.

    python bench/bench_import.py --rows 1000000 --repeats 3
    python bench/bench_import.py --rows 1e5,3e5,1e6,3e6 --repeats 5 --baseline /tmp/old/bin/python

Per-token JSONL, for each size of ``--rows``: ``--repeats`` alternating rounds of `moeprof import`
and of the reference, ``polars.read_ndjson`` + ``write_parquet`` of the same file (no checks, no
trace), each in a fresh process, timed from after its library's imports (polars; moeprof's
importer modules) and as a whole process; prints both (median [min - max]) and the ratios import /
reference per round. ``--baseline`` names another interpreter (another checkout's environment, or a wrapper
that puts an older tree on PYTHONPATH) whose import is timed in the same rounds. Megatron: one
import of the last size. Prints rows/s and the peak RSS growth; memory must stay flat as --rows
grows (the importers stream).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moeprof.importers import ImportOptions, import_trace


def write_jsonl(path: Path, rows: int, k: int, experts: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, experts, size=(rows, k))
    with open(path, "w") as fh:
        fh.write(json.dumps({"meta": {"model": {"name": "bench", "num_experts": experts, "top_k": k}}}) + "\n")
        for i in range(rows):
            tok = i // 8
            fh.write(json.dumps({"req_id": tok // 256, "token_idx": tok % 256, "layer": i % 8,
                                 "topk_ids": ids[i].tolist(), "topk_weights": [0.125] * k,
                                 "phase": "prefill" if tok % 256 < 200 else "decode"}) + "\n")


def write_megatron(path: Path, rows: int, k: int, experts: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per = 512
    with open(path, "w") as fh:
        for r in range(rows // per):
            top = rng.integers(0, experts, size=(per, k)).tolist()
            fh.write(json.dumps({"step": r // 8, "stage": "pre_dispatch", "block": "decoder", "layer": r % 8,
                                 "rank": 0, "num_tokens": per, "topk": k, "top_indices": top}) + "\n")


_IMPORT = """
import sys, time, json, resource
from pathlib import Path
from moeprof.importers import ImportOptions, import_trace
try:  # the modules an import runs, imported before the clock starts, as the reference's polars is
    import moeprof.importers.run, moeprof.importers.jsonl, moeprof.trace.writer
except ImportError:
    pass
t0 = time.perf_counter()
rep = import_trace("jsonl", [Path(sys.argv[1])], Path(sys.argv[2]), ImportOptions(num_experts=int(sys.argv[3]), force=True))
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(seconds=time.perf_counter() - t0, rows=rep.routing_rows, cpu=ru.ru_utime + ru.ru_stime,
                      peak_rss=ru.ru_maxrss * 1024)))
"""

_POLARS = """
import sys, time, json, resource
import polars as pl
t0 = time.perf_counter()
df = pl.read_ndjson(sys.argv[1])
df.write_parquet(sys.argv[2])
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(seconds=time.perf_counter() - t0, rows=df.height, cpu=ru.ru_utime + ru.ru_stime,
                      peak_rss=ru.ru_maxrss * 1024)))
"""


def _child(code: str, *args: str, python: str = sys.executable) -> dict:
    t0 = time.perf_counter()
    # -P: the code imports moeprof from the interpreter's environment (or PYTHONPATH), not from here
    res = subprocess.run([python, "-P", "-c", code, *args], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process"] = time.perf_counter() - t0  # the whole process: interpreter start and imports too
    return out


def _spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(float(np.median(xs)))} [{fmt.format(min(xs))} - {fmt.format(max(xs))}]"


def _sizes(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def jsonl_point(tmp: Path, rows: int, args: argparse.Namespace) -> dict:
    """One size: alternating rounds of the reference, this import and the baseline's; prints them."""
    src = tmp / f"jsonl-{rows}.jsonl"
    write_jsonl(src, rows, args.top_k, args.experts)
    size = src.stat().st_size
    ours, ref, base = [], [], []
    for r in range(args.repeats):
        arms = [("ref", lambda: ref.append(_child(_POLARS, str(src), str(tmp / "ref.parquet")))),
                ("ours", lambda: ours.append(_child(_IMPORT, str(src), str(tmp / "t-jsonl"), str(args.experts))))]
        if args.baseline:
            arms.append(("base", lambda: base.append(_child(_IMPORT, str(src), str(tmp / "t-base"), str(args.experts),
                                                            python=args.baseline))))
        for _, run in arms[r % len(arms):] + arms[: r % len(arms)]:  # each arm first in turn
            run()
    src.unlink()
    rows = ours[0]["rows"]
    gib = 1 << 30
    mo, po = [o["seconds"] for o in ours], [p["seconds"] for p in ref]
    print(f"per-token JSONL: {rows:,} rows, {size / 2**20:.1f} MiB, {args.repeats} alternating rounds "
          "(median [min - max])")
    print(f"  polars.read_ndjson + write_parquet: {_spread(po)} s, {rows / float(np.median(po)):,.0f} rows/s, "
          f"peak RSS {max(p['peak_rss'] for p in ref) / gib:.2f} GiB")
    print(f"  moeprof import jsonl:               {_spread(mo)} s, {rows / float(np.median(mo)):,.0f} rows/s, "
          f"peak RSS {max(o['peak_rss'] for o in ours) / gib:.2f} GiB")
    ratio = [m / p for m, p in zip(mo, po)]
    print(f"  import / polars: {_spread(ratio)}x")
    print(f"  CPU seconds, whole process (less sensitive to load): polars {_spread([p['cpu'] for p in ref])}, "
          f"import {_spread([o['cpu'] for o in ours])}")
    whole = [o["process"] / p["process"] for o, p in zip(ours, ref)]
    print(f"  whole processes (interpreter start and imports too): polars {_spread([p['process'] for p in ref])} s, "
          f"import {_spread([o['process'] for o in ours])} s, import / polars {_spread(whole)}x")
    out = dict(rows=rows, mib=size / 2**20, ratio=ratio, seconds=mo, polars=po, whole=whole)
    if base:
        bo = [b["seconds"] for b in base]
        print(f"  baseline import ({args.baseline}): {_spread(bo)} s, {_spread([b / p for b, p in zip(bo, po)])}x polars, "
              f"CPU {_spread([b['cpu'] for b in base])}; import / baseline {_spread([m / b for m, b in zip(mo, bo)])}x")
        out.update(baseline=bo)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=_sizes, default=[1_000_000], help="sizes, comma-separated (default 1e6)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="alternating import / reference rounds (default 3)")
    ap.add_argument("--baseline", help="another interpreter whose moeprof import is timed in the same rounds")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        points = [jsonl_point(Path(tmp), rows, args) for rows in args.rows]
        if len(points) > 1:
            print("\nsize          MiB   import / polars (median [min - max])   whole processes" +
                  ("   import / baseline" if args.baseline else ""))
            for p in points:
                line = f"{p['rows']:>11,} {p['mib']:7.1f}   {_spread(p['ratio']):>24}x   {_spread(p['whole']):>24}x"
                if "baseline" in p:
                    line += f"   {_spread([m / b for m, b in zip(p['seconds'], p['baseline'])])}x"
                print(line)
        src = Path(tmp) / "megatron.jsonl"
        write_megatron(src, args.rows[-1], args.top_k, args.experts)
        size = src.stat().st_size
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        rep = import_trace("megatron", [src], Path(tmp) / "t-megatron", ImportOptions(num_experts=args.experts))
        dt = time.perf_counter() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"megatron  rows={rep.routing_rows:>9d} input={size / 2**20:7.1f} MiB  "
              f"{dt:6.2f} s  {rep.routing_rows / dt:>9.0f} rows/s  {size / 2**20 / dt:6.1f} MiB/s  "
              f"peak RSS growth {max(0, rss1 - rss0) / 1024:.0f} MiB")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
