"""Evidence for `moeprof simulate --timeline`: the real Llama-4-Maverick trace and the sample trace.

Converts ``../shared/realdata/llama4_maverick_mmlu/routing.csv.gz`` (387 MMLU requests recorded on SGLang,
top-1 of 128 experts on the 24 odd layers; README there) into a moeprof trace with moeprof's own writer
(cached under bench/out/), then replays its decode steps in time order (no batch_id: requests enter in
request order, --concurrency at a time) under the engine default, a placement fitted once, periodic
EPLB, and the grouping policies (kmeans, locality) fitted once; prints one Markdown table per topology,
the per-window table of the winner, the comparison with the seed paper's Maverick figures, and the
same for sample_data/trace. Maverick's dimensions (hidden 5120, MoE intermediate 8192, bf16) are its
published config.

Run: python bench/timeline_evidence.py [--concurrency 64] [--skip-sample]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl

from moeprof.placement.latency import hardware
from moeprof.placement.timeline import timeline
from moeprof.placement.topology import build_topology
from moeprof.placement.traffic import default_rank_cost
from moeprof.trace import ModelInfo, TraceWriter

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realdata" / "llama4_maverick_mmlu"
OUT = ROOT / "bench" / "out"
MAVERICK = dict(hidden=5120, inter=8192)


def convert_llama4(src: Path, out: Path) -> Path:
    """routing.csv.gz (request_id, domain, phase, token_idx, decode_step, layer, expert_ids) -> trace."""
    if (out / "manifest.json").is_file():
        return out
    df = pl.read_csv(src / "routing.csv.gz", schema_overrides={"expert_ids": pl.String, "decode_step": pl.Int64,
                                                                 "token_idx": pl.Int64})
    # decode_step counts from 0; the trace's step counts decode steps from 1 (0 is the prefill);
    # token_idx is the position in the sequence for both phases
    df = df.with_columns(
        pl.when(pl.col("phase") == "prefill").then(0).otherwise(pl.col("decode_step") + 1).alias("step"),
        pl.col("token_idx").alias("pos"),
        pl.col("expert_ids").str.split(" ").list.first().cast(pl.Int64).alias("expert"),
    ).sort(["request_id", "step", "pos", "layer"])
    layers = sorted(df["layer"].unique().to_list())
    model = ModelInfo(name="Llama-4-Maverick-17B-128E-Instruct", num_experts=128, top_k=1, moe_layers=layers,
                      architecture="Llama4ForConditionalGeneration", num_layers=48, num_shared_experts=1,
                      hidden_size=MAVERICK["hidden"], dtype="bfloat16")
    reqs = pl.read_csv(src / "requests.csv")
    with TraceWriter(out, model=model, source="jsonl", force=True,
                     notes=[f"converted from {src.name}/routing.csv.gz by bench/timeline_evidence.py"]) as w:
        for r in reqs.iter_rows(named=True):
            w.set_request(r["request_id"], r["domain"], prompt_tokens=r["prefill_tokens_logged"],
                          decode_tokens=r["decode_steps"])
        w.write_routing(dict(request_id=df["request_id"].to_numpy(), step=df["step"].to_numpy(),
                             phase=np.where(df["phase"].to_numpy() == "prefill", 0, 1).astype(np.int8),
                             pos=df["pos"].to_numpy(), layer=df["layer"].to_numpy(),
                             experts=df["expert"].to_numpy()[:, None]))
    return out


def g(x: float) -> str:
    """Thousands with separators, small numbers with four significant digits."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def table(d: dict) -> str:
    t = d["topology"]
    lines = [
        f"**{t['nodes']} nodes × {t['gpus_per_node']} GPUs** ({t['slots_per_gpu']} slots each, "
        f"{t['num_redundant_experts']} redundant), {d['passes']:,} "
        f"passes, {d['tokens']:,} decode tokens, {d['hardware']['name']}",
        "",
        "| policy · schedule | µs/step | vs default | comm share | cross-node B/token | vs default | "
        "busiest GPU max/mean | rebalances | weights moved | migration µs/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        v = r["vs_default"]
        lines.append(
            f"| {r['key']} | {g(r['us_per_step'])} | {v['step_time']:+.1%} | {r['comm_share']:.1%} | "
            f"{r['cross_node_bytes_per_token']:,.0f} | {v['cross_node_bytes']:+.1%} | {r['load_max_mean']:.2f} | "
            f"{r['rebalances']} | {g(r['migration_bytes'] / 2**30)} GiB | "
            + (f"once: {r['migration_one_time_s']:.3g} s |" if r["migration_one_time_s"] else
               f"{g(r['migration_us_per_step'])} |"))
    lines += ["", f"verdict: {d['verdict']}"]
    return "\n".join(lines)


def paper(d: dict) -> str:
    """Against the default: data, communication time and layer time, beside the paper's Maverick figures."""
    lines = ["| placement (vs linear, static) | cross-node data | communication time | MoE layer time |",
             "|---|---:|---:|---:|",
             "| seed paper, Maverick (measured) | about -20% | -9% | -5.5% |"]
    base = d["rows"][0]
    for r in d["rows"][1:]:
        layer = r["moe_us_per_step"] / base["moe_us_per_step"] - 1
        lines.append(f"| {r['key']} (predicted) | {r['vs_default']['cross_node_bytes']:+.1%} | "
                     f"{r['vs_default']['comm_time']:+.1%} | {layer:+.1%} |")
    return "\n".join(lines)


def windows(d: dict) -> str:
    base = d["rows"][0]
    best = min(d["rows"][1:], key=lambda r: r["us_per_step"])
    lines = [f"| passes | {base['key']}: busiest / cross-node MiB / µs | {best['key']}: busiest / cross-node MiB / µs "
             "| weights moved |", "|---|---:|---:|---:|"]
    for a, b in zip(base["windows"], best["windows"]):
        lines.append(f"| {a['start']}-{a['end'] - 1} | {a['busiest_load']:.2f} / {a['cross_node_bytes'] / 2**20:.1f} / "
                     f"{a['moe_us_per_step']:.1f} | {b['busiest_load']:.2f} / {b['cross_node_bytes'] / 2**20:.1f} / "
                     f"{b['moe_us_per_step']:.1f} | {b['migration_bytes'] / 2**30:.1f} GiB |")
    return "\n".join(lines)


def run(trace: Path, **kw) -> dict:
    t0 = time.perf_counter()
    d = timeline(trace, **kw)
    print(f"({len(d['rows'])} replays in {time.perf_counter() - t0:.1f} s)\n")
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--skip-sample", action="store_true")
    args = ap.parse_args()
    hw = hardware("h100", "nvlink4", "ib400")
    if REAL.is_dir():
        t0 = time.perf_counter()
        trace = convert_llama4(REAL, OUT / "llama4-maverick-trace")
        print(f"Llama-4-Maverick trace at {trace} ({time.perf_counter() - t0:.1f} s)\n")
        for nodes, gpus, redundant, pols in [(2, 8, None, ["linear", "eplb", "kmeans", "locality"]),
                                             (2, 8, 16, ["linear", "eplb"]), (4, 4, None, ["linear", "eplb"])]:
            d = run(trace, nodes=nodes, gpus_per_node=gpus, redundant=redundant, hw=hw, policies=pols,
                    every=[50, 100, 200], concurrency=args.concurrency, moe_intermediate_size=MAVERICK["inter"],
                    report_windows=10)
            print(table(d) + "\n")
            print(windows(d) + "\n")
            print(paper(d) + "\n")
        # the same fits with and without being told that a hop between nodes costs 10 × one inside a node
        topo_file = OUT / "rank-cost-2x8.json"
        topo_file.write_text(json.dumps({"rank_cost_matrix": default_rank_cost(build_topology(128, 2, 8)).tolist()}))
        runs = [run(trace, nodes=2, gpus_per_node=8, hw=hw, policies=["linear", "eplb", "locality"], every=[200],
                    concurrency=args.concurrency, moe_intermediate_size=MAVERICK["inter"], rank_cost=cost)
                for cost in (None, topo_file)]
        print(f"--rank-cost {topo_file.name} (1 inside a node, 10 between nodes), 2 × 8 GPUs:\n")
        print("| policy · schedule | cross-node B/token without / with | busiest GPU max/mean without / with | "
              "µs/step without / with |\n|---|---:|---:|---:|")
        for a, b in zip(*(d["rows"] for d in runs)):
            print(f"| {a['key']} | {a['cross_node_bytes_per_token']:,.0f} / {b['cross_node_bytes_per_token']:,.0f} | "
                  f"{a['load_max_mean']:.2f} / {b['load_max_mean']:.2f} | {g(a['us_per_step'])} / {g(b['us_per_step'])} |")
        print()
    else:
        print(f"{REAL} not found: skipping the Llama-4 trace\n")
    if not args.skip_sample:
        for redundant in (None, 8):
            d = run(ROOT / "sample_data" / "trace", nodes=2, gpus_per_node=4, redundant=redundant, hw=hw,
                    policies=["linear", "eplb", "locality"])
            print(table(d) + "\n")
            print(paper(d) + "\n")


if __name__ == "__main__":
    main()
