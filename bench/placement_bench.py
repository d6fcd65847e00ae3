"""Time every placement policy on a DeepSeek-V3-sized problem: 256 experts × 58 MoE layers onto
8 nodes × 8 GPUs (4 slots per GPU, and 5 with 64 redundant experts).

The counts are drawn, not captured: R requests in 4 domains, each request's per-layer counts a
multinomial draw from a Zipf popularity mixed with its domain's (as moeprof.synthetic plants them).
Prints wall and CPU seconds per policy (CPU time is the steadier figure on a shared machine). Run: python bench/placement_bench.py [--requests 512]

With ``--kmeans-requests N``, instead: the K-means of N such requests' decode signatures (8 clusters,
as for 8 nodes) as mergeable rounds (moeprof.placement.kmeans), in one loop, on 2 local threads, and on
Ray clusters of 1 and 2 one-CPU nodes bound to 127.0.0.1 (``ray.cluster_utils.Cluster``); wall seconds
(best of ``--repeat`` after an untimed run) and the ratio to the loop, every result checked bit for bit
against the loop's.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from moeprof.placement.policies import POLICIES, FitInput
from moeprof.placement.topology import build_topology


def counts(R: int, L: int, E: int, tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    zipf = 1.0 / np.arange(1, E + 1)
    base = np.stack([rng.permutation(zipf) for _ in range(L)])  # [L, E]
    doms = np.stack([np.stack([rng.permutation(zipf) for _ in range(L)]) for _ in range(4)])  # [4, L, E]
    p = 0.3 * base[None] / base.sum(-1, keepdims=True)[None] + 0.7 * doms / doms.sum(-1, keepdims=True)
    domain = np.arange(R) % 4
    out = np.empty((R, L, E), dtype=np.int32)
    for r in range(R):
        for layer in range(L):
            out[r, layer] = rng.multinomial(tokens, p[domain[r], layer])
    return out, domain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256, help="token-routes per request, layer and phase")
    ap.add_argument("--kmeans-requests", type=int, default=None, help="time K-means rounds on the engines instead")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--block-mib", type=float, default=None, help="K-means block size (default: moeprof's)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    L, E = 58, 256
    if args.kmeans_requests:
        if args.block_mib:
            from moeprof.placement import kmeans

            kmeans.BLOCK_BYTES = int(args.block_mib * 2**20)
        kmeans_engines(args.kmeans_requests, L, E, args.tokens, args.repeat)
        return
    t0 = time.perf_counter()
    decode, domain = counts(args.requests, L, E, args.tokens, rng)
    prefill, _ = counts(args.requests, L, E, args.tokens, np.random.default_rng(1))
    print(f"counts: {args.requests} requests × {L} layers × {E} experts drawn in {time.perf_counter() - t0:.1f} s; "
          f"{os.cpu_count()} CPUs visible")
    for redundant in (0, 64):
        topo = build_topology(E, 8, 8, redundant=redundant)
        fit = FitInput(load=decode, prefill=prefill, domains=domain.astype(str), topology=topo, seed=0)
        print(f"\n{topo.describe()}")
        for name, policy in POLICIES.items():
            t0, c0 = time.perf_counter(), time.process_time()
            res = policy(fit)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            assert res.phy2log.shape == (L, topo.num_slots)
            print(f"  {name:12s} {dt:7.2f} s wall {dc:7.2f} s CPU")


def kmeans_engines(R: int, L: int, E: int, tokens: int, repeat: int) -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only; read when Ray is imported
    import ray
    from ray.cluster_utils import Cluster

    from moeprof.analysis.engine import LocalEngine, RayEngine
    from moeprof.placement.data import signatures
    from moeprof.placement.kmeans import fit_kmeans

    t0 = time.perf_counter()
    x = signatures(counts(R, L, E, tokens, np.random.default_rng(0))[0])
    print(f"signatures: {R} requests x {L * E} drawn in {time.perf_counter() - t0:.1f} s ({x.nbytes / 2**20:.0f} MiB "
          f"as float32); {os.cpu_count()} CPUs visible", flush=True)

    def best(engine, ref=None):
        fit = fit_kmeans(x, 8, 0, engine=engine)  # untimed: worker start, imports
        if ref is not None:
            assert np.array_equal(fit.labels, ref.labels) and fit.centroids.tobytes() == ref.centroids.tobytes()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fit_kmeans(x, 8, 0, engine=engine)
            times.append(time.perf_counter() - t)
        return min(times), fit

    results = {}
    results["one loop"], ref = best(None)
    print(f"{ref.blocks} blocks, {ref.rounds} Lloyd rounds after 7 seeding rounds, clusters of "
          f"{np.bincount(ref.labels).tolist()}", flush=True)
    results["local, 2 threads"], _ = best(LocalEngine(2), ref)
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
                best(eng, ref)
        finally:
            ray.shutdown()
            c.shutdown()
    print(f"{'engine':<26} {'seconds':>8} {'vs one loop':>12}   (labels and centroids: the same bits everywhere)")
    for name, sec in results.items():
        print(f"{name:<26} {sec:8.2f} {results['one loop'] / sec:11.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
