"""Evidence for `moeprof place`: every policy on held-out requests of a trace with planted domain structure.

Writes a synthetic trace (moeprof.synthetic: 4 domains, Zipf skew, domain shift, per-request signal
shared by prefill and decode), then runs the same comparison as `moeprof simulate --compare` for a few
topologies and prints one Markdown table per topology (the README's). With --trace, uses that trace
instead (e.g. sample_data/trace).

Run: python bench/placement_evidence.py [--trace DIR] [--out bench/out/evidence]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moeprof.placement.run import compare
from moeprof.synthetic import generate_trace

TOPOLOGIES = [(4, 4, None), (4, 4, 32), (8, 2, None), (8, 2, 32)]


def markdown(cmp) -> str:
    rows = cmp.rows
    eplb = next(r for r in rows if r["key"] == "eplb")
    t = cmp.topology
    lines = [
        f"**{t['nodes']} nodes × {t['gpus_per_node']} GPUs × {t['slots_per_gpu']} slots "
        f"({t['num_redundant_experts']} redundant)**, {cmp.split['test_requests']} held-out requests "
        f"({rows[0]['tokens']:,} decode tokens)",
        "",
        "| policy | grouping | cross-node KiB/token | vs eplb | intra-node KiB/token | own node | GPU max/mean median (p90) | fit s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rel = r["cross_node_bytes_per_token"] / eplb["cross_node_bytes_per_token"] - 1
        g = r["gpu_load_max_mean"]
        lines.append(
            f"| {r['key']} | {r['grouping']} | {r['cross_node_bytes_per_token'] / 1024:.1f} | {rel:+.1%} | "
            f"{r['intra_node_bytes_per_token'] / 1024:.1f} | {r['local_node_share']:.1%} | "
            f"{g['median']:.2f} ({g['p90']:.2f}) | {r['fit_seconds']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/out/evidence"))
    args = ap.parse_args()
    trace = args.trace
    if trace is None:
        trace = args.out / "synthetic-trace"
        t0 = time.perf_counter()
        generate_trace(trace, num_requests=600, domains=("code", "math", "chat", "general"), num_layers=8,
                       num_experts=64, top_k=4, prompt_tokens=(32, 128), decode_tokens=(32, 96), skew=1.0,
                       domain_strength=0.7, request_strength=0.3, first_moe_layer=1, hidden_size=2048, seed=0,
                       force=True)
        print(f"synthetic trace {trace} written in {time.perf_counter() - t0:.1f} s\n")
    for nodes, gpus, redundant in TOPOLOGIES:
        cmp = compare(trace, nodes=nodes, gpus_per_node=gpus, redundant=redundant)
        print(markdown(cmp) + "\n")


if __name__ == "__main__":
    main()
