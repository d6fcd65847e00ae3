"""Peak memory of `moeprof place` and `simulate --placement` against rows and requests, old code against new.

    python bench/placement_memory.py --old /tmp/moeprof-main                 # the default grid
    python bench/placement_memory.py --traces 1e4x1000 --sample-requests 4096,1024,256   # memory follows the budget

``--old DIR`` is another checkout (e.g. ``git archive main | tar -x -C DIR``) whose place and
simulate read every routing row of the trace into the process; this checkout reads a request sample
(``--sample-requests``, default 4096; ``--sample-rows``, default 8,388,608 token rows), one task
per shard. The traces are DeepSeek-V3-shaped (58 MoE layers x 256 experts, top-8, four domains;
``bench/analyze_memory.py``'s generator, cached under bench/out/): ``REQUESTSxROWS`` gives the
requests and the routing rows per request (half prefill, half decode tokens, each routed in a window
of consecutive layers). Each command runs in a fresh subprocess (one thread per shard task on the
local engine) and prints its peak RSS (its own ``VmHWM``), wall seconds, the requests it fitted on and
scored, and a digest of the metrics (equal digests: equal results); ``new/old`` is the ratio of the
peak RSS of this checkout's run to the other's on the same trace (with ``--sample-requests``
values, ``code`` says which: ``new:1024``). Old runs whose arithmetic
(about 240 B a routing row plus 119 KB a request) exceeds ``--old-limit-gib`` are not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))
from analyze_bench import LAYERS, OWN_PEAK, E  # noqa: E402  the benchmark model's shape, the children's peak
from analyze_memory import generate  # noqa: E402  the same traces (request-major shards)

GIB = 1 << 30

_RUN = OWN_PEAK + """
import sys, time, resource, json, hashlib
sys.path.insert(0, sys.argv[1])
import moeprof.placement.run as run
assert run.__file__.startswith(sys.argv[1]), (run.__file__, sys.argv[1])  # the checkout asked for
what, trace, placement, policy, budget = sys.argv[2:7]
kw = dict(sample_requests=int(budget)) if budget != "-" else {}
t0 = time.perf_counter()
if what == "place":
    p, _, notes = run.place(trace, nodes=8, gpus_per_node=8, policy=policy, out=placement, force=True, **kw)
    metrics = p.metrics
else:
    _, metrics, notes = run.simulate_placement(trace, placement)
dt = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
fit = json.load(open(placement)).get("fit", {})
peak = own_peak()
print(json.dumps(dict(seconds=dt, peak_rss=peak, scored=metrics["requests"],
                      fitted=fit.get("train_requests"), tokens=metrics["tokens"],
                      results=hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest()[:12])))
"""


def _child(root: Path, what: str, trace: Path, placement: Path, policy: str, budget: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    res = subprocess.run([sys.executable, "-c", _RUN, str(root), what, str(trace), str(placement), policy, budget],
                         capture_output=True, text=True, env=env)
    if res.returncode:
        tail = res.stderr.strip().splitlines()
        return dict(error=tail[-1] if tail else f"exit {res.returncode} (killed?)")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _num(text: str) -> int:
    return int(float(text.replace("_", "")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default="1e3x1000,1e4x100,1e4x1000,1e5x100",
                    help="REQUESTSxROWS_PER_REQUEST, comma-separated (default: 10^6 and 10^7 rows, 10^3..10^5 requests)")
    ap.add_argument("--old", type=Path, help="another moeprof checkout to run the same commands with")
    ap.add_argument("--old-limit-gib", type=float, default=6.0, help="skip old runs estimated above this (default 6)")
    ap.add_argument("--policy", default="eplb", help="policy place fits (default eplb: the fit itself is instant)")
    ap.add_argument("--sample-requests", default="-",
                    help="values of place's --sample-requests for the new code, comma-separated (default: its default)")
    args = ap.parse_args()
    per_request = 2 * len(LAYERS) * E * 4
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; policy {args.policy}, "
          "8 nodes x 8 GPUs")
    print(f"{'requests':>9} {'rows':>11} {'command':>9} {'code':>9} {'peak RSS GiB':>13} {'seconds':>8} "
          f"{'fitted':>7} {'scored':>7} {'results':>13}  new/old peak")
    budgets = [x.strip() for x in args.sample_requests.split(",") if x.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="placement-memory-"))
    for spec in args.traces.split(","):
        n, per = (_num(x) for x in spec.lower().split("x"))
        trace = OUT / f"memory-{n}-{per}"
        manifest = trace / "manifest.json"
        if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
            t0 = time.perf_counter()
            generate(trace, n, per)
            print(f"generated {trace} in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = sum(s["rows"] for s in json.loads(manifest.read_text())["shards"] if s["kind"] == "routing")
        old_gib = (rows * 240 + n * per_request) / GIB
        codes = [("new", ROOT, b) for b in budgets]
        if args.old is not None:
            if old_gib <= args.old_limit_gib:
                codes.insert(0, ("old", args.old.resolve(), "-"))
            else:
                print(f"{n:>9,} {rows:>11,} {'both':>9} {'old':>9}   not run: about {old_gib:.1f} GiB "
                      "(240 B a row + 119 KB a request) > --old-limit-gib")
        for what in ("place", "simulate"):
            peaks = {}
            for code, root, budget in codes:
                placement = tmp / f"{code}-{n}-{per}-{budget}.json"
                r = _child(root, what, trace, placement, args.policy, budget)
                label = code if budget == "-" else f"{code}:{budget}"
                if "error" in r:
                    print(f"{n:>9,} {rows:>11,} {what:>9} {label:>9}   failed: {r['error']}", flush=True)
                    continue
                peaks[code] = r["peak_rss"]
                ratio = f"{peaks['new'] / peaks['old']:.2f}" if code == "new" and "old" in peaks else ""
                print(f"{n:>9,} {rows:>11,} {what:>9} {label:>9} {r['peak_rss'] / GIB:>13.2f} {r['seconds']:>8.1f} "
                      f"{r['fitted'] or '-':>7} {r['scored']:>7} {r['results']:>13}  {ratio}", flush=True)


if __name__ == "__main__":
    main()
