"""Rows/s of the analysis pass on Ray workers (1 and 2) next to the local engine, on this machine.

    python bench/ray_bench.py --rows 20_000_000

Uses the DeepSeek-V3-shaped trace of ``bench/analyze_bench.py`` (58 MoE layers x 256 experts, top-8;
generated once, cached under bench/out/). Times the part that runs on the engine: the pass that reads
every routing row and builds the mergeable aggregates (counts per request x phase x layer x expert,
the bottom-k token sample). On Ray that is one task per shard plus the tree merge, and the driver's
final merge into the aggregates; the statistics computed afterwards from the aggregates do not grow
with the rows and are not part of the figure.

Each Ray cluster is a real ``ray.cluster_utils.Cluster`` bound to 127.0.0.1, with one node of one
CPU per worker. Every configuration first runs once untimed (worker start, imports), then is timed
``--repeat`` times; the best time is printed. The aggregates of every run are checked equal to the
local engine's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only; read when Ray is imported

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def _analyze_bench():
    spec = importlib.util.spec_from_file_location("analyze_bench", HERE / "analyze_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pass(trace, sel, engine):
    from moeprof.analysis.aggregate import aggregate_routing
    from moeprof.analysis.shards import aggregate_shards

    t0 = time.perf_counter()
    if engine is None:
        agg = aggregate_routing(trace, sel, threads=1)
    elif isinstance(engine, int):
        agg = aggregate_routing(trace, sel, threads=engine)
    else:
        agg = aggregate_shards(trace, sel, engine)
    return time.perf_counter() - t0, agg


def _best(trace, sel, engine, repeat, reference=None):
    _, agg = _pass(trace, sel, engine)  # warm-up: page cache, Ray workers, imports
    if reference is not None:
        assert all(np.array_equal(getattr(agg, f), getattr(reference, f)) for f in ("domains", "sampled", "seen"))
        assert agg.rows == reference.rows
        assert np.array_equal(np.sort(agg.sample.token), np.sort(reference.sample.token))
    return min(_pass(trace, sel, engine)[0] for _ in range(repeat)), agg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000_000, help="routing rows (default 2e7)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sample-tokens", type=int, default=1 << 17,
                    help="analyze's token sample (default 131072, analyze's own); a trace of 1e11 rows keeps a "
                         "tiny share of its rows in it, a bench trace of 1e7 keeps almost all")
    args = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    from moeprof.analysis.engine import RayEngine
    from moeprof.analysis.run import build_selection
    from moeprof.trace import Trace

    trace_dir = OUT / f"trace-{args.rows}"
    manifest = trace_dir / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
        t0 = time.perf_counter()
        _analyze_bench().generate(trace_dir, args.rows)
        print(f"generated {trace_dir} in {time.perf_counter() - t0:.1f} s", flush=True)
    trace = Trace.open(trace_dir)
    rows = trace.num_routing_rows
    sel = build_selection(trace, None, None, 0, args.sample_tokens)
    print(f"trace: {rows:,} routing rows in {len(trace.shard_paths('routing'))} shards, "
          f"{trace.size_bytes / (1 << 30):.2f} GiB; sample of {args.sample_tokens:,} tokens; "
          f"{os.cpu_count()} CPU cores on this machine", flush=True)

    results = {}
    results["local, 1 thread"], ref = _best(trace, sel, None, args.repeat)
    results["local, 2 threads"], _ = _best(trace, sel, 2, args.repeat, ref)
    for workers in (1, 2):
        node = dict(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=1 << 30)
        c = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
        try:
            for _ in range(workers - 1):
                c.add_node(**node)
            ray.init(address=c.address, log_to_driver=False, configure_logging=False)
            eng = RayEngine()
            assert eng.workers == workers
            results[f"ray, {workers} worker{'s' if workers > 1 else ''} ({workers} node{'s' if workers > 1 else ''})"], _ = \
                _best(trace, sel, eng, args.repeat, ref)
        finally:
            ray.shutdown()
            c.shutdown()
    base = results["local, 1 thread"]
    print(f"{'engine':<28} {'seconds':>8} {'M rows/s':>9} {'vs local 1 thread':>18}")
    for name, sec in results.items():
        print(f"{name:<28} {sec:8.2f} {rows / sec / 1e6:9.2f} {base / sec:17.2f}x")
    one = rows / results["ray, 1 worker (1 node)"]
    two = rows / results["ray, 2 workers (2 nodes)"]
    print(f"2 workers / 1 worker: {two / one:.2f}x on {os.cpu_count()} cores shared with the driver "
          f"(load average {os.getloadavg()[0]:.1f})")
    print(f"per Ray worker (the 1-worker run): {one / 1e6:.2f} M rows/s; 10^11 rows on 64 such workers, "
          f"if storage keeps up: 1e11 / (64 x {one / 1e6:.2f}e6) = {1e11 / (64 * one) / 60:.1f} min")


if __name__ == "__main__":
    main()
