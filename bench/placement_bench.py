"""Time every placement policy on a DeepSeek-V3-sized problem: 256 experts × 58 MoE layers onto
8 nodes × 8 GPUs (4 slots per GPU, and 5 with 64 redundant experts).

The counts are drawn, not captured: R requests in 4 domains, each request's per-layer counts a
multinomial draw from a Zipf popularity mixed with its domain's (as moeprof.synthetic plants them).
Prints seconds per policy. Run: python bench/placement_bench.py [--requests 512]
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
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    L, E = 58, 256
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
            t0 = time.perf_counter()
            res = policy(fit)
            dt = time.perf_counter() - t0
            assert res.phy2log.shape == (L, topo.num_slots)
            print(f"  {name:12s} {dt:7.2f} s")


if __name__ == "__main__":
    main()
