"""`moeprof analyze` against bounded-memory scan floors at sizes too large for analyze_bench's rounds (10^9 rows).

    python bench/analyze_scale.py --rows 1e9 --rounds 2 --json bench/results/analyze_scale-1e9.json
    python bench/analyze_scale.py --requests 1e6 --rows-per-request 1100 --rounds 2 \
        --json bench/results/analyze_scale-1e6req.json          # 1.1e9 rows in 10^6 requests: memory
    python bench/analyze_scale.py --rows 1e8 --rounds 3 --floors arrow,verified,polars,eager   # all floors

Generates the trace (cached under bench/out/ unless ``--delete``): with ``--rows``, analyze_bench's
generator (DeepSeek-V3 shape, ~5,000 tokens a request); with ``--requests``, analyze_memory's (many
short requests). It reads the routing shards once into the page cache, then runs ``--rounds``
rounds of fresh subprocesses, one per arm, the arms' order reversed every other round so that load
from other processes falls on every arm alike; the 1-minute load average is recorded before and
after each child. Arms:

- analyze: analyze_bench's child (every statistic, summary.json and the tables, not the plots),
  timed from the call, after imports;
- floor ``arrow``: pyarrow reads the columns analyze reads (request_id, step, phase, pos, layer,
  experts, batch_id), row group by row group, on a pool of as many threads as CPUs (one shard per
  task, ``use_threads=False`` per read, as analyze's pass does), and drops each table: the decode
  that any analysis of these columns must do, with memory bounded by two row groups;
- floor ``verified``: the same, reading each shard's bytes once and checking their sha256 against
  the manifest first, as analyze does (``Trace.shard_bytes``): analyze's read path, less its counting;
- floor ``polars``: ``pl.scan_parquet`` over the shards, the same columns summed (max for phase),
  ``collect(engine="streaming")``;
- floor ``eager``: analyze_bench's floor, which reads every shard into memory through
  ``Trace.routing`` (its shards verified, so concatenated eagerly) before the streaming
  aggregation; its memory grows with the rows, so it runs under an address-space cap
  (``--scan-cap-gib``) and is for comparison with analyze_bench's figures only.

Prints each child's result (seconds, CPU, peak RSS, load), then per arm the median [min - max],
and analyze / floor per round (each analyze run against the same round's floor run).

Peak RSS: the floors report their own ``VmHWM``; analyze reports analyze_bench's ``ru_maxrss``,
which on Linux starts from the parent's peak (kept across exec), so this script generates traces in
a child and prints its own peak at the end: analyze's figure is its own where it is larger.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import analyze_bench as b

GIB = 1 << 30
COLUMNS = ["request_id", "step", "phase", "pos", "layer", "experts", "batch_id"]  # analyze_bench's floor's

_ARROW = b.OWN_PEAK + """
import sys, time, resource, json, os
from concurrent.futures import ThreadPoolExecutor
import pyarrow as pa
import pyarrow.parquet as pq
from moeprof.trace import Trace
t = Trace.open(sys.argv[1])
verify, cols = sys.argv[2] == "verified", json.loads(sys.argv[3])
paths = t.shard_paths("routing")
t0 = time.perf_counter()

def shard(path):
    if verify:  # the bytes read once and sha256-checked, as analyze's ShardReader does
        pf = pq.ParquetFile(pa.BufferReader(t.shard_bytes(path)))
    else:
        pf = pq.ParquetFile(path)
    rows = 0
    for i in range(pf.num_row_groups):
        table = pf.read_row_group(i, columns=cols, use_threads=False)
        rows += table.num_rows
        del table
    return rows

with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
    rows = sum(pool.map(shard, paths))
dt = time.perf_counter() - t0
assert rows == t.num_routing_rows, (rows, t.num_routing_rows)
ru = resource.getrusage(resource.RUSAGE_SELF)
hwm = own_peak()
print(json.dumps(dict(seconds=dt, cpu=ru.ru_utime + ru.ru_stime, peak_rss=hwm, rows=rows)))
"""

_POLARS = b.OWN_PEAK + """
import sys, time, resource, json
import polars as pl
from moeprof.trace import Trace
t = Trace.open(sys.argv[1])
cols = json.loads(sys.argv[2])
paths = [str(p) for p in t.shard_paths("routing")]
t0 = time.perf_counter()
# sums, not max: nothing here can be answered from the row groups' statistics
aggs = [pl.len()] + [
    pl.col(c).to_physical().max() if c == "phase" else pl.col(c).arr.sum().sum() if c == "experts" else pl.col(c).sum()
    for c in cols
]
r = pl.scan_parquet(paths).select(cols).select(aggs).collect(engine="streaming")
dt = time.perf_counter() - t0
rows = int(r.item(0, 0))
assert rows == t.num_routing_rows, (rows, t.num_routing_rows)
ru = resource.getrusage(resource.RUSAGE_SELF)
hwm = own_peak()
print(json.dumps(dict(seconds=dt, cpu=ru.ru_utime + ru.ru_stime, peak_rss=hwm, rows=rows)))
"""


def child(code: str, *args: str, python: str = sys.executable, cap: int | None = None) -> dict:
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    # -P: the code imports moeprof from the interpreter's environment, not from the current directory
    r = subprocess.run([python, "-P", "-c", code, *args], capture_output=True, text=True,
                       preexec_fn=limit if cap else None)
    dt = time.perf_counter() - t0
    load = [load0, os.getloadavg()[0]]
    if r.returncode:
        return {"failed": r.returncode, "stderr": r.stderr[-600:], "process": dt, "load": load}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out.update(process=dt, load=load)
    return out


def _spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    if not xs:
        return "-"
    return f"{fmt.format(float(np.median(xs)))} [{fmt.format(min(xs))} - {fmt.format(max(xs))}]"


def _num(text: str) -> int:
    return int(float(text.replace("_", "")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1e9", help="routing rows of analyze_bench's trace (default 1e9)")
    ap.add_argument("--requests", help="instead, analyze_memory's trace of this many requests")
    ap.add_argument("--rows-per-request", type=int, default=1100, help="with --requests (default 1100)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    ap.add_argument("--floors", default="arrow,polars",
                    help="comma-separated: arrow, verified, polars, eager (default arrow,polars)")
    ap.add_argument("--baseline", metavar="PYTHON", help="also time analyze with this interpreter")
    ap.add_argument("--scan-cap-gib", type=float, default=16, help="address-space cap of the eager floor (default 16)")
    ap.add_argument("--json", type=Path, help="write every child's result and the summary here")
    ap.add_argument("--delete", action="store_true", help="delete the trace and outputs afterwards")
    args = ap.parse_args()
    floors = [f.strip() for f in args.floors.split(",") if f.strip()]
    unknown = set(floors) - {"arrow", "verified", "polars", "eager"}
    if unknown:
        ap.error(f"--floors: unknown {sorted(unknown)}")
    if args.requests:
        n = _num(args.requests)
        trace = b.OUT / f"memory-{n}-{args.rows_per_request}"
    else:
        n = _num(args.rows)
        trace = b.OUT / f"trace-{n}"
    manifest = trace / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
        # in a child: a child's ru_maxrss starts from its parent's peak (Linux keeps it across exec),
        # so this process must stay small for analyze's peak RSS to be its own
        t0 = time.perf_counter()
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import analyze_bench as b, analyze_memory as m; "
                "from pathlib import Path; t = Path(sys.argv[2]); n = int(sys.argv[3]); "
                "m.generate(t, n, int(sys.argv[4])) if sys.argv[4] != '0' else b.generate(t, n)")
        subprocess.run([sys.executable, "-c", code, str(b.HERE), str(trace), str(n),
                        str(args.rows_per_request if args.requests else 0)], check=True)
        print(f"generated {trace} in {time.perf_counter() - t0:.0f} s", flush=True)
    from moeprof.trace import Trace

    t = Trace.open(trace)
    rows = t.num_routing_rows
    for p in t.shard_paths("routing"):  # into the page cache, so every arm reads from memory alike
        p.read_bytes()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{trace}: {rows:,} routing rows, {t.size_bytes / GIB:.2f} GiB; {os.cpu_count()} CPUs; {uptime}", flush=True)

    outs = {"analyze": b.OUT / f"analysis-{trace.name}", "baseline": b.OUT / f"analysis-{trace.name}-baseline"}
    arms = {
        "analyze": lambda: child(b._ANALYZE, str(trace), str(outs["analyze"])),
        "arrow": lambda: child(_ARROW, str(trace), "bare", json.dumps(COLUMNS)),
        "verified": lambda: child(_ARROW, str(trace), "verified", json.dumps(COLUMNS)),
        "polars": lambda: child(_POLARS, str(trace), json.dumps(COLUMNS)),
        "eager": lambda: child(b._FLOOR, str(trace), cap=int(args.scan_cap_gib * GIB)),
    }
    if args.baseline:
        arms["baseline"] = lambda: child(b._ANALYZE, str(trace), str(outs["baseline"]), python=args.baseline)
    order = ["analyze", *floors] + (["baseline"] if args.baseline else [])
    res: dict[str, list[dict]] = {a: [] for a in order}
    for k in range(args.rounds):
        for arm in order if k % 2 == 0 else order[::-1]:
            r = arms[arm]()
            res[arm].append(r)
            shown = {key: (round(v, 2) if isinstance(v, float) else v) for key, v in r.items() if key != "load"}
            print(f"round {k + 1} {arm:>8}: {shown}, load {r['load'][0]:.1f} -> {r['load'][1]:.1f}", flush=True)

    ok = {a: [r for r in rs if "seconds" in r] for a, rs in res.items()}
    summary: dict[str, dict] = {}
    print(f"\n{rows:,} routing rows, {args.rounds} alternating rounds; median [min - max]")
    for arm in order:
        rs = ok[arm]
        failed = len(res[arm]) - len(rs)
        loads = [x for r in res[arm] for x in r["load"]]
        summary[arm] = dict(seconds=[r["seconds"] for r in rs], cpu=[r["cpu"] for r in rs],
                            peak_rss_gib=[r["peak_rss"] / GIB for r in rs], failed=failed,
                            load=[min(loads), max(loads)])
        print(f"  {arm:>8}: {_spread(summary[arm]['seconds'])} s, CPU {_spread(summary[arm]['cpu'])} s, "
              f"peak RSS {_spread(summary[arm]['peak_rss_gib'])} GiB, load {min(loads):.1f}-{max(loads):.1f}"
              + (f", FAILED {failed}x: {res[arm][-1].get('stderr', '')[-200:]!r}" if failed else ""))
    for f in floors:
        pairs = [(a["seconds"], x["seconds"], a["cpu"], x["cpu"])
                 for a, x in zip(res["analyze"], res[f]) if "seconds" in a and "seconds" in x]
        wall, cpu = [p[0] / p[1] for p in pairs], [p[2] / p[3] for p in pairs]
        summary[f].update(ratio_wall=wall, ratio_cpu=cpu)
        print(f"  analyze / {f:<8} wall {_spread(wall)}x, CPU {_spread(cpu)}x (per round; target 3x wall)")
    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    print(f"{uptime_end}; this process's peak RSS {parent_peak:.2f} GiB (a floor on analyze's ru_maxrss)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            command=" ".join(["python", "bench/analyze_scale.py", *sys.argv[1:]]), trace=trace.name, rows=rows,
            size_gib=t.size_bytes / GIB, cpus=os.cpu_count(), machine=platform.platform(), uptime_start=uptime,
            uptime_end=uptime_end, parent_peak_rss_gib=parent_peak, order=order, runs=res, summary=summary), indent=1))
        print(f"wrote {args.json}")
    if args.delete:
        for d in [trace, *outs.values()]:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
