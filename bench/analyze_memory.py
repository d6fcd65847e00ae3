"""Peak memory of `moeprof analyze` against the number of requests, on synthetic DeepSeek-V3-shape traces.

    python bench/analyze_memory.py --requests 1e6                      # 10^6 requests, 10^7 rows
    python bench/analyze_memory.py --requests 1e3,3e3,1e6 --old ../main # the same against another checkout
    python bench/analyze_memory.py --requests 200 --rows-per-request 50000 --old ../main --repeats 3
                                                                        # long requests: same speed?

Per-request statistics (classification, prefill->decode) keep the counts of a seeded sample of
``--sample-requests`` requests; everything else is summed per domain. This benchmark shows that the
peak memory stays flat as the number of requests grows: it generates (once, cached under bench/out/)
a trace per request count with 58 MoE layers (3..60), 256 experts, top-8, four domains and
``--rows-per-request`` rows per request (prefill then decode tokens, each routed in a window of
consecutive layers; rows drawn from per-domain x layer pools of Zipf-skewed top-8 patterns, so
generation is fast), then runs the whole analysis (every statistic, outputs not written) in a fresh
subprocess per trace and prints its peak RSS (its own ``VmHWM``: a child's ``ru_maxrss`` starts from its parent's peak), wall time (from the call), CPU seconds
of the whole process, and a digest of its results (the summary less the trace's path and what only
the request sample adds: equal digests, equal results).

``--old DIR`` runs the same analysis with the moeprof of another checkout (``git worktree add DIR
main``), whose analyze keeps every request's counts; only request counts whose arithmetic (printed
first) fits ``--old-limit-gib`` are run with it.
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
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))
from analyze_bench import DOMAINS, LAYERS, OWN_PEAK, E, K, bench_model  # noqa: E402  the same model and domains

POOL = 1024  # top-k patterns per domain x layer
GIB = 1 << 30


def _pool(rng: np.random.Generator) -> np.ndarray:
    """``(D, L, POOL, K)`` int16 top-k patterns, Gumbel-top-k of a per-domain x layer Zipf(1.1) popularity."""
    out = np.empty((len(DOMAINS), len(LAYERS), POOL, K), np.int16)
    w = 1.0 / np.arange(1, E + 1) ** 1.1
    for d in range(len(DOMAINS)):
        for li in range(len(LAYERS)):
            p = np.empty(E)
            p[rng.permutation(E)] = w
            scores = np.log(p / p.sum())[None, :] + rng.gumbel(size=(POOL, E))
            out[d, li] = np.argsort(-scores, axis=1)[:, :K]
    return out


def generate(path: Path, requests: int, rows_per_request: int, seed: int = 0) -> None:
    from moeprof.trace import TraceWriter
    from moeprof.trace.schema import routing_schema
    from moeprof.trace.writer import phase_array

    rng = np.random.default_rng(seed)
    pool = _pool(rng)
    schema = routing_schema(K)
    w = TraceWriter(path, model=bench_model(), source="synthetic", force=True, shard_rows=1 << 23, request_shards=True,
                    capture=dict(generator="bench/analyze_memory.py", requests=requests, seed=seed),
                    notes=["benchmark trace: many short requests, rows drawn from pools of top-k patterns"])
    L = len(LAYERS)
    ntok = max(2, -(-rows_per_request // L))  # tokens per request, the first half prefill
    per = max(1, rows_per_request // ntok)  # each routed in a window of `per` consecutive layers
    n_pre = ntok // 2
    block = max(1, 1_000_000 // rows_per_request)  # requests per table: ~10^6 rows queued at a time
    for r0 in range(0, requests, block):
        rid = np.arange(r0, min(requests, r0 + block), dtype=np.int64)
        n = rid.size
        dom = rid % len(DOMAINS)
        for r in rid.tolist():
            w.set_request(r, DOMAINS[r % len(DOMAINS)], dataset="bench", prompt_tokens=n_pre,
                          decode_tokens=ntok - n_pre)
        # rows: request-major, then token, then its window of layers
        first = rng.integers(0, L - per + 1, size=(n, ntok))
        req = np.repeat(np.arange(n), ntok * per)
        tok = np.tile(np.repeat(np.arange(ntok), per), n)
        li = first[req, tok] + np.tile(np.arange(per), n * ntok)
        step = np.where(tok < n_pre, 0, tok - n_pre + 1).astype(np.int32)
        pick = rng.integers(0, POOL, size=req.size)
        experts = pool[dom[req], li, pick]
        rows = req.size
        table = pa.Table.from_arrays(
            [
                pa.array(rid[req]),
                pa.array(step),
                phase_array((tok >= n_pre).astype(np.int8), rows),
                pa.array(tok.astype(np.int32)),
                pa.array(np.asarray(LAYERS, np.int16)[li]),
                pa.FixedSizeListArray.from_arrays(pa.array(experts.reshape(-1)), K),
                pa.nulls(rows, schema.field("weights").type),
                pa.nulls(rows, pa.int64()),
                pa.nulls(rows, pa.int32()),
            ],
            schema=schema,
        )
        w.write_routing(table)
    w.close()


_ANALYZE = OWN_PEAK + """
import sys, time, resource, json
sys.path.insert(0, sys.argv[1])
import moeprof.analysis.run as run
from moeprof.analysis.run import analyze_trace
assert run.__file__.startswith(sys.argv[1]), (run.__file__, sys.argv[1])  # the checkout asked for
t0 = time.perf_counter()
kw = json.loads(sys.argv[3])
a = analyze_trace(sys.argv[2], **kw)
dt = time.perf_counter() - t0
s = a.summary
# the results without what only the request sample adds, to compare with a checkout that has none
import hashlib, copy
c = copy.deepcopy(s)
c["trace"].pop("path"); c["selection"].pop("sample_requests", None)
for sec in ("classification", "prefill_decode"):
    for key in ("requests_in_trace", "whole_trace", "sample_note") + (("requests",) if sec == "classification" else ()):
        c[sec].pop(key, None)
digest = hashlib.sha256(json.dumps(c).encode()).hexdigest()[:12]
ru = resource.getrusage(resource.RUSAGE_SELF)
peak = own_peak()
print(json.dumps(dict(seconds=dt, cpu=ru.ru_utime + ru.ru_stime, peak_rss=peak, requests=s["trace"]["requests"],
                      rows=s["trace"]["rows_analyzed"],
                      pd_requests=s["prefill_decode"].get("requests"),
                      pd_whole=s["prefill_decode"].get("whole_trace"),
                      cls_test=s["classification"].get("test_requests"), results=digest)))
"""


def _child(root: Path, trace: Path, **kw) -> dict:
    res = subprocess.run([sys.executable, "-c", _ANALYZE, str(root), str(trace), json.dumps(kw)],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(root)))
    if res.returncode:
        return dict(error=res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _num(text: str) -> int:
    return int(float(text.replace("_", "")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", default="1e6", help="request counts, comma-separated (default 1e6)")
    ap.add_argument("--rows-per-request", type=int, default=10, help="routing rows per request (default 10)")
    ap.add_argument("--sample-requests", default="4096",
                    help="values of --sample-requests to run, comma-separated (default 4096)")
    ap.add_argument("--old", type=Path, help="another moeprof checkout (e.g. main) to run the same analysis with")
    ap.add_argument("--old-limit-gib", type=float, default=8.0,
                    help="run --old only where its per-request counts' arithmetic stays below this (default 8)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds per trace, the codes alternating (default 1)")
    ap.add_argument("--regenerate", action="store_true")
    args = ap.parse_args()
    counts = [_num(x) for x in args.requests.split(",") if x.strip()]
    samples = [_num(x) for x in args.sample_requests.split(",") if x.strip()]
    per_request = 2 * len(LAYERS) * E * 4  # int32 counts per request x phase x layer x expert
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"per-request counts at this shape: 2 x {len(LAYERS)} x {E} x 4 B = {per_request / 1024:.0f} KiB; "
          f"for 10^6 requests {1e6 * per_request / GIB:.0f} GiB")
    print(f"{'requests':>10} {'rows':>12} {'code':>6} {'sample':>7} {'peak RSS GiB':>13} {'seconds':>8} {'CPU s':>6}  "
          f"{'results':>12}  prefill->decode requests (whole trace)")
    for n in counts:
        trace = OUT / f"memory-{n}-{args.rows_per_request}"
        manifest = trace / "manifest.json"
        if args.regenerate or not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
            t0 = time.perf_counter()
            generate(trace, n, args.rows_per_request)
            print(f"generated {trace} in {time.perf_counter() - t0:.1f} s", flush=True)
        runs = [("new", ROOT, dict(sample_requests=s)) for s in samples]
        if args.old is not None:
            if n * per_request / GIB <= args.old_limit_gib:
                runs.append(("old", args.old.resolve(), {}))
            else:
                print(f"{n:>10,} {'':>12} {'old':>6} {'-':>7}   not run: its per-request counts alone take "
                      f"{n * per_request / GIB:.1f} GiB (> --old-limit-gib)")
        for name, root, kw in runs * args.repeats:
            r = _child(root, trace, **kw)
            if "error" in r:
                print(f"{n:>10,} {'':>12} {name:>6} {kw.get('sample_requests', '-'):>7}   failed: {r['error']}")
                continue
            print(f"{r['requests']:>10,} {r['rows']:>12,} {name:>6} {kw.get('sample_requests', '-'):>7} "
                  f"{r['peak_rss'] / GIB:>13.2f} {r['seconds']:>8.1f} {r['cpu']:>6.1f}  {r['results']:>12}  {r['pd_requests']}"
                  + ("" if r["pd_whole"] is None else f" ({r['pd_whole']})"),
                  flush=True)


if __name__ == "__main__":
    main()
