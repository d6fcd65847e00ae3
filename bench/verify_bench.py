"""What verifying every shard's sha256 while reading costs `moeprof analyze` (issue 12).

    python bench/verify_bench.py --rows 10_000_000

Generates (once, cached under bench/out/) the DeepSeek-V3-shaped synthetic trace of
``bench/analyze_bench.py`` with ``--rows`` routing rows, then times :func:`analyze_trace` on it with
``verify_reads`` on (each shard read once, hashed, parsed from the same buffer: what every command
does) and off (the file parsed straight from disk, no checksum), alternating the two ``--repeats``
times so that both see the same page cache and machine load. Prints each run, the medians, the
ratio verified / unverified, and the time sha256 alone takes over the same bytes. Both wall time and
CPU time (all threads of the process) are given: on a shared machine the CPU time ratio is the one
that other processes' load does not move.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=lambda s: int(s.replace("_", "")), default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="analyze threads [CPU count]")
    args = ap.parse_args()

    from analyze_bench import OUT, generate

    from moeprof.analysis.run import analyze_trace
    from moeprof.trace.reader import Trace

    path = OUT / f"verify-{args.rows}" / "trace"
    if not (path / "manifest.json").exists():
        t0 = time.perf_counter()
        generate(path, args.rows)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t0:.0f} s: {path}")
    trace = Trace.open(path, verify="full")
    size = trace.size_bytes
    print(f"trace: {trace.num_routing_rows:,} routing rows, {len(trace.manifest.shards)} files, {size / 1e9:.2f} GB")

    # sha256 alone over every shard (from the page cache), the floor of what verification adds.
    c0 = time.process_time()
    for s in trace.manifest.shards:
        hashlib.sha256((path / s.path).read_bytes()).hexdigest()
    hash_s = time.process_time() - c0

    analyze_trace(path, verify_reads=False, threads=args.threads)  # warm the page cache
    wall: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.repeats):
        for verify in ((True, False) if i % 2 == 0 else (False, True)):
            t0, c0 = time.perf_counter(), time.process_time()
            analyze_trace(path, verify_reads=verify, threads=args.threads)
            wall[verify].append(time.perf_counter() - t0)
            cpu[verify].append(time.process_time() - c0)
            print(f"  run {i + 1} verify_reads={verify!s:5}: wall {wall[verify][-1]:7.2f} s, cpu {cpu[verify][-1]:7.2f} s")
    for name, t in (("wall", wall), ("cpu", cpu)):
        on, off = statistics.median(t[True]), statistics.median(t[False])
        print(f"analyze {name} time, median of {args.repeats}: verified {on:.2f} s, unverified {off:.2f} s, "
              f"ratio {on / off:.3f} ({(on / off - 1) * 100:+.1f}%)")
    off_cpu = statistics.median(cpu[False])
    print(f"sha256 alone over the {size / 1e9:.2f} GB: {hash_s:.2f} s cpu ({hash_s / off_cpu * 100:.1f}% of the "
          "unverified analyze's cpu time)")


if __name__ == "__main__":
    main()
