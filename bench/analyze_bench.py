"""Benchmark `moeprof analyze` against a bare scan of the same columns, on synthetic traces of DeepSeek-V3 shape.

    python bench/analyze_bench.py --rows 1e6,1e7,1e8 --repeats 5     # the grid quoted in the README
    python bench/analyze_bench.py --rows 1e7 --compare-polars
    python bench/analyze_bench.py --rows 1e6,1e7 --baseline /tmp/main-venv/bin/python   # before / after

Generates (once, cached under bench/out/) a trace per size with 58 MoE layers (3..60), 256 experts,
top-8 and realistic skew: per layer a Zipf(1.1) popularity, per domain a mixture with its own Zipf
popularity, per request a window of the domain's pattern pool (request signal). Generation is cheap:
each row's top-8 is drawn from a precomputed pool of Gumbel-top-k patterns per domain x layer.

Then, per size, ``--repeats`` rounds, each running in fresh subprocesses (so peak RSS is their own),
alternating so that load from other processes falls on both alike:
- the floor: a bare polars streaming scan that reads the columns analyze reads, once;
- analyze: every statistic, then summary.json and the tables written (what `moeprof analyze --out`
  writes, less the plots, which the report layer draws), timed from the call, after imports;
  its whole process (interpreter start, imports, analysis, outputs) is timed too;
- optionally (``--baseline``) analyze again under another interpreter, e.g. a virtual environment with
  the main branch installed, to compare two versions at the same load (the two in turn first);
- optionally (``--full-tables``) analyze again with ``coactivation_tables="full"`` (every co-activation
  row, as analyze wrote before ``top`` became the default), to tell that change from the others;
- optionally the same counts with a polars explode + group_by, to compare with numpy bincount.
Prints, per size, medians with [min - max]: floor, analyze, analyze / floor (per round), the whole
process, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
LAYERS = list(range(3, 61))  # DeepSeek-V3: layers 0-2 dense, 3-60 MoE
E, K = 256, 8
DOMAINS = ("code", "math", "chat", "general")
POOL = 4096  # top-k patterns per domain x layer
WINDOW = 512  # patterns a request draws from: its own slice of the pool (request signal)


def _zipf(rng: np.random.Generator, skew: float) -> np.ndarray:
    w = 1.0 / np.arange(1, E + 1) ** skew
    p = np.empty(E)
    p[rng.permutation(E)] = w
    return p / p.sum()


def _pool(rng: np.random.Generator) -> np.ndarray:
    """``(D, L, POOL, K)`` int16 top-k patterns drawn by Gumbel-top-k from each domain x layer popularity."""
    out = np.empty((len(DOMAINS), len(LAYERS), POOL, K), np.int16)
    glob = [_zipf(rng, 1.1) for _ in LAYERS]
    for d in range(len(DOMAINS)):
        for li in range(len(LAYERS)):
            p = 0.5 * glob[li] + 0.5 * _zipf(rng, 1.1)
            scores = np.log(p)[None, :] + rng.gumbel(size=(POOL, E))
            top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
            out[d, li] = np.take_along_axis(top, order, axis=1)
            # sort the pool by its first expert so a request's window of patterns shares experts
        out[d] = np.take_along_axis(out[d], np.argsort(out[d][:, :, 0], axis=1, kind="stable")[:, :, None], axis=1)
    return out


def bench_model():
    """The model section of every benchmark trace here: DeepSeek-V3's shape (also bench/analyze_memory.py)."""
    from moeprof.trace import ModelInfo

    return ModelInfo(name="synthetic-deepseek-v3-shape", architecture="DeepseekV3ForCausalLM", num_experts=E,
                     top_k=K, moe_layers=LAYERS, num_layers=61, dense_layers=[0, 1, 2], num_shared_experts=1,
                     hidden_size=7168, dtype="bfloat16")


def generate(path: Path, rows: int, seed: int = 0) -> None:
    from moeprof.trace import TraceWriter
    from moeprof.trace.writer import phase_array
    from moeprof.trace.schema import routing_schema

    rng = np.random.default_rng(seed)
    pool = _pool(rng)
    schema = routing_schema(K)
    w = TraceWriter(path, model=bench_model(), source="synthetic", force=True, shard_rows=1 << 21,
                    capture=dict(generator="bench/analyze_bench.py", rows=rows, seed=seed),
                    notes=["benchmark trace: rows drawn from pools of top-k patterns per domain x layer"])
    written, rid, batch = 0, 0, 0
    L = len(LAYERS)
    while written < rows:
        d = rid % len(DOMAINS)
        P, D = int(rng.integers(200, 1201)), int(rng.integers(50, 401))
        T = P + D
        if written + T * L > rows:
            T = max(1, (rows - written) // L)
            P, D = min(P, T), T - min(P, T)
        w.set_request(rid, DOMAINS[d], dataset="bench", prompt_tokens=P, decode_tokens=D)
        start = int(rng.integers(0, POOL - WINDOW))
        step = np.concatenate([np.zeros(P, np.int32), np.arange(1, D + 1, dtype=np.int32)])
        bid = np.concatenate([np.full(P, batch, np.int64), batch + np.arange(1, D + 1, dtype=np.int64)])
        phase = phase_array(np.tile((step > 0).astype(np.int8), L), T * L)
        pick = start + rng.integers(0, WINDOW, size=(L, T))
        experts = pool[d, np.arange(L)[:, None], pick]  # (L, T, K)
        table = pa.Table.from_arrays(
            [
                pa.array(np.full(T * L, rid, np.int64)),
                pa.array(np.tile(step, L)),
                phase,
                pa.array(np.tile(np.arange(T, dtype=np.int32), L)),
                pa.array(np.repeat(np.asarray(LAYERS, np.int16), T)),
                pa.FixedSizeListArray.from_arrays(pa.array(experts.reshape(-1)), K),
                pa.nulls(T * L, schema.field("weights").type),
                pa.array(np.tile(bid, L)),
                pa.nulls(T * L, pa.int32()),
            ],
            schema=schema,
        )
        w.write_routing(table)
        written += T * L
        rid += 1
        batch += D + 1
    w.close()


# Put before every child's code: the child's own peak RSS. VmHWM, not ru_maxrss, which a child starts
# from its parent's peak (inherited at exec).
OWN_PEAK = """
def own_peak():
    with open('/proc/self/status') as status:
        return int(next(line for line in status if line.startswith('VmHWM')).split()[1]) * 1024
"""

_FLOOR = OWN_PEAK + """
import sys, time, resource, json
import polars as pl
from moeprof.trace import Trace
t = Trace.open(sys.argv[1])
t0 = time.perf_counter()
cols = ["request_id", "step", "phase", "pos", "layer", "experts", "batch_id"]
r = t.routing(cols).select(
    pl.col("request_id").max(), pl.col("step").max(), pl.col("phase").to_physical().max(), pl.col("pos").max(),
    pl.col("layer").max(), pl.col("experts").arr.max().max(), pl.col("batch_id").max(),
).collect(engine="streaming")
dt = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
peak = own_peak()
print(json.dumps(dict(seconds=dt, cpu=ru.ru_utime + ru.ru_stime, peak_rss=peak)))
"""

_ANALYZE = OWN_PEAK + """
import sys, time, resource, json
t0 = time.perf_counter()
from pathlib import Path
from moeprof.analysis.run import analyze
t1 = time.perf_counter()
options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
a = analyze(sys.argv[1], out=Path(sys.argv[2]), force=True, **options)  # what `analyze --out` does, less the plots' writer
t2 = time.perf_counter()
ru = resource.getrusage(resource.RUSAGE_SELF)
peak = own_peak()
print(json.dumps(dict(seconds=t2 - t1, imports=t1 - t0, cpu=ru.ru_utime + ru.ru_stime, peak_rss=peak,
                      tokens=a.summary["trace"]["tokens"], requests=a.summary["trace"]["requests"])))
"""


_POLARS_COUNTS = OWN_PEAK + """
import sys, time, resource, json
import polars as pl
from moeprof.trace import Trace
t = Trace.open(sys.argv[1])
t0 = time.perf_counter()
r = (t.routing(["request_id", "phase", "layer", "experts"]).with_columns(pl.col("experts").arr.to_list())
     .explode("experts").group_by(["request_id", "phase", "layer", "experts"]).len().collect(engine="streaming"))
dt = time.perf_counter() - t0
peak = own_peak()
print(json.dumps(dict(seconds=dt, peak_rss=peak, groups=r.height)))
"""


def _child(code: str, *args: str, python: str = sys.executable) -> dict:
    t0 = time.perf_counter()
    # -P: the code imports moeprof from the interpreter's environment, not from the current directory
    res = subprocess.run([python, "-P", "-c", code, *args], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process"] = time.perf_counter() - t0
    return out


def _rows(text: str) -> int:
    return int(float(text.replace("_", "")))


def _spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(float(np.median(xs)))} [{fmt.format(min(xs))} - {fmt.format(max(xs))}]"


def run_size(rows_wanted: int, repeats: int, regenerate: bool, compare_polars: bool, baseline: str | None = None,
             full_tables: bool = False) -> dict:
    trace = OUT / f"trace-{rows_wanted}"
    manifest = trace / "manifest.json"
    cached = manifest.exists() and json.loads(manifest.read_text()).get("complete")
    if regenerate or not cached:
        t0 = time.perf_counter()
        generate(trace, rows_wanted)
        print(f"generated {trace} in {time.perf_counter() - t0:.1f} s", flush=True)
    from moeprof.trace import Trace

    t = Trace.open(trace)
    rows = t.num_routing_rows
    for p in t.shard_paths("routing"):  # warm the page cache so both runs read from memory alike
        p.read_bytes()
    floors, analyses, befores, fulls = [], [], [], []
    for n in range(repeats):
        floors.append(_child(_FLOOR, str(trace)))
        # analyze and the baseline in turn first (the run right after the floor found other cores' load
        # otherwise than the next one): odd rounds run the baseline first
        if baseline and n % 2:
            befores.append(_child(_ANALYZE, str(trace), str(OUT / f"analysis-{rows_wanted}-baseline"), python=baseline))
        analyses.append(_child(_ANALYZE, str(trace), str(OUT / f"analysis-{rows_wanted}")))
        if baseline and not n % 2:
            befores.append(_child(_ANALYZE, str(trace), str(OUT / f"analysis-{rows_wanted}-baseline"), python=baseline))
        if full_tables:
            fulls.append(_child(_ANALYZE, str(trace), str(OUT / f"analysis-{rows_wanted}-full"),
                                json.dumps({"coactivation_tables": "full"})))
    gib = 1 << 30
    fl = [f["seconds"] for f in floors]
    an = [a["seconds"] for a in analyses]
    ratio = [a / f for a, f in zip(an, fl)]
    r0 = analyses[0]
    print(f"\n{rows:,} routing rows, {r0['tokens']:,} tokens, {r0['requests']:,} requests, "
          f"{t.size_bytes / gib:.2f} GiB on disk ({repeats} alternating rounds; median [min - max])")
    print(f"  floor (polars streaming scan, same columns): {_spread(fl)} s, "
          f"peak RSS {max(f['peak_rss'] for f in floors) / gib:.2f} GiB")
    print(f"  analyze (statistics + summary + tables):    {_spread(an)} s, "
          f"peak RSS {_spread([a['peak_rss'] / gib for a in analyses])} GiB")
    print(f"  analyze / floor:                            {_spread(ratio)}x")
    print(f"  CPU seconds, whole process (less sensitive to load): floor {_spread([f['cpu'] for f in floors])}, "
          f"analyze {_spread([a['cpu'] for a in analyses])}")
    print(f"  analyze's whole process (start, imports):   {_spread([a['process'] for a in analyses])} s "
          f"(imports {_spread([a['imports'] for a in analyses])} s)")
    if befores:
        print(f"  baseline analyze ({baseline}): {_spread([b['seconds'] for b in befores])} s, "
              f"{_spread([b['seconds'] / f for b, f in zip(befores, fl)])}x the floor, "
              f"CPU {_spread([b['cpu'] for b in befores])} s, whole process {_spread([b['process'] for b in befores])} s, "
              f"peak RSS {_spread([b['peak_rss'] / gib for b in befores])} GiB; "
              f"analyze / baseline {_spread([a / b['seconds'] for a, b in zip(an, befores)])}x")
    if fulls:
        print(f"  analyze, --coactivation-tables full:        {_spread([x['seconds'] for x in fulls])} s, "
              f"{_spread([x['seconds'] / f for x, f in zip(fulls, fl)])}x the floor, "
              f"CPU {_spread([x['cpu'] for x in fulls])} s, whole process {_spread([x['process'] for x in fulls])} s")
    if compare_polars:
        pc = _child(_POLARS_COUNTS, str(trace))
        print(f"  counts only, polars explode + group_by:     {pc['seconds']:.2f} s, "
              f"peak RSS {pc['peak_rss'] / gib:.2f} GiB ({pc['groups']:,} groups)")
    return dict(rows=rows, floor=fl, analyze=an, ratio=ratio, peak_rss=[a["peak_rss"] for a in analyses],
                process=[a["process"] for a in analyses])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1e6,1e7,1e8", help="routing rows, comma-separated sizes (default 1e6,1e7,1e8)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating floor/analyze rounds per size (default 3)")
    ap.add_argument("--compare-polars", action="store_true", help="also time the counts as a polars group_by")
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--full-tables", action="store_true", help="also time analyze with --coactivation-tables full "
                    "(every co-activation row) in the same rounds")
    ap.add_argument("--baseline", metavar="PYTHON", help="also time analyze with this interpreter (a virtual "
                    "environment holding another checkout of moeprof), in the same alternating rounds")
    args = ap.parse_args()
    sizes = [_rows(x) for x in args.rows.split(",") if x.strip()]
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the start")
    results = [run_size(n, args.repeats, args.regenerate, args.compare_polars, args.baseline, args.full_tables)
               for n in sizes]
    print(f"\nload average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    print("\nsize         analyze / floor (median [min - max])   analyze s   peak RSS GiB")
    for r in results:
        print(f"{r['rows']:>12,}  {_spread(r['ratio']):>30}x   {float(np.median(r['analyze'])):>9.2f}   "
              f"{max(r['peak_rss']) / (1 << 30):>6.2f}")


if __name__ == "__main__":
    main()
