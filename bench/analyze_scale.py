"""One round of `bench/analyze_bench.py` at a size too large for its alternating rounds (10^9 rows: 4.9 GB).

    python bench/analyze_scale.py --rows 1e9 --baseline MAIN/bin/python --scan-cap-gib 16 --delete

Generates the trace with analyze_bench's generator (cached under bench/out/ unless ``--delete``), reads
its shards once into the page cache, then runs analyze_bench's children once each, in this order:
analyze (this checkout), analyze under ``--baseline``, and the scan floor, the last under an
address-space cap (``--scan-cap-gib``): the polars scan's memory grows with the rows (4.45 GiB at 10^8),
and on a shared machine it must fail rather than take the memory of others. Prints each child's
result (seconds, CPU, peak RSS) and, if the floor finished, analyze / floor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import analyze_bench as b


def child(code: str, *args: str, python: str = sys.executable, cap: int | None = None) -> dict:
    t0 = time.perf_counter()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    r = subprocess.run([python, "-P", "-c", code, *args], capture_output=True, text=True,
                       preexec_fn=limit if cap else None)
    dt = time.perf_counter() - t0
    if r.returncode:
        return {"failed": r.returncode, "stderr": r.stderr[-600:], "process": dt}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process"] = dt
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1e9", help="routing rows (default 1e9)")
    ap.add_argument("--baseline", metavar="PYTHON", help="also time analyze with this interpreter")
    ap.add_argument("--scan-cap-gib", type=float, default=16, help="address-space cap of the scan (default 16)")
    ap.add_argument("--delete", action="store_true", help="delete the trace and outputs afterwards")
    args = ap.parse_args()
    rows = int(float(args.rows))
    trace = b.OUT / f"trace-{rows}"
    manifest = trace / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
        t0 = time.perf_counter()
        b.generate(trace, rows)
        print(f"generated {trace} in {time.perf_counter() - t0:.0f} s", flush=True)
    print("load average", " ".join(f"{x:.1f}" for x in os.getloadavg()), flush=True)
    for p in sorted((trace / "routing").glob("*.parquet")):
        p.read_bytes()
    outs = [b.OUT / f"analysis-{rows}", b.OUT / f"analysis-{rows}-baseline"]
    res = {"analyze": child(b._ANALYZE, str(trace), str(outs[0]))}
    print("analyze", res["analyze"], "load average", os.getloadavg(), flush=True)
    if args.baseline:
        res["baseline"] = child(b._ANALYZE, str(trace), str(outs[1]), python=args.baseline)
        print("baseline", res["baseline"], "load average", os.getloadavg(), flush=True)
    res["floor"] = child(b._FLOOR, str(trace), cap=int(args.scan_cap_gib * (1 << 30)))
    print("floor", res["floor"], "load average", os.getloadavg(), flush=True)
    if "seconds" in res["floor"] and "seconds" in res["analyze"]:
        print(f"analyze / floor: {res['analyze']['seconds'] / res['floor']['seconds']:.2f}x")
    if args.delete:
        for d in [trace, *outs]:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
