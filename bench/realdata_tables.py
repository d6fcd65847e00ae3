"""What moeprof finds on real models: the README's tables, from ../shared/realdata (see its README).

For each set: import (the expert-selection tarball and the vLLM logs as published; the long/wide CSV
tables converted to per-token JSONL or a counts table, as tests/test_realdata.py does), analyze, and
print imbalance, domain shift, prefill->decode with its controls and domain classification. For the
Llama-4-Maverick set, also the placement table on held-out requests for two topologies, each with and
without redundant experts (hidden 5120, bf16), next to the published figures.

Run: python bench/realdata_tables.py [--work DIR] [--sets llama,qwen,esft,gptoss,mixtral,olmoe-olmoe,olmoe-mistral]
[--no-placement]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import polars as pl

from moeprof.analysis.run import analyze_trace
from moeprof.importers import ImportOptions, import_trace
from moeprof.placement.data import load_routing, split_requests
from moeprof.placement.run import fit_policy, score, sim_config
from moeprof.placement.topology import build_topology
from moeprof.trace.reader import Trace

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
PUBLISHED = ("seed paper (arXiv 2510.05497): prefill->decode aggregate correlation Maverick 0.82, Qwen3 0.68, "
             "DeepSeek-V3 0.55; domain from prefill > 94%; 'up to 20%' less all-to-all data")
TOPOLOGIES = [(4, 8, 0), (4, 8, 32), (8, 4, 0), (8, 4, 32)]
RUNS = [("eplb", None, {}), ("kmeans", None, {}), ("locality", None, {}),
        ("locality", None, {"robust": False}), ("locality", "domain", {})]


def _jsonl(df: pl.DataFrame, path: Path, meta: dict) -> Path:
    df = df.with_columns(pl.col("topk_ids").str.split(" ").cast(pl.List(pl.Int64)))
    path.write_text(json.dumps(meta) + "\n" + df.write_ndjson())
    return path


def _domains(pairs: dict, path: Path) -> Path:
    pl.DataFrame({"request_id": list(map(str, pairs)), "domain": list(pairs.values())}).write_csv(path)
    return path


def sources(work: Path) -> dict[str, tuple[str, Path, ImportOptions, str]]:
    """name -> (format, source, options, what it is)."""
    out = {}
    out["llama"] = ("expert-selection", REAL / "llama4_maverick_mmlu" / "original.tar.gz",
                    ImportOptions(num_experts=128, model_name="Llama-4-Maverick-17B-128E-Instruct"),
                    "Llama-4-Maverick (SGLang), 3 MMLU subjects, top-1 of 128")
    out["qwen"] = ("jsonl", REAL / "vllm_moe_logger_qwen15" / "qwen15moe_gsm8k_layer0.jsonl",
                   ImportOptions(num_experts=60, drop_warmup=True), "Qwen1.5-MoE on vLLM, layer 0, GSM8K, top-4 of 60")
    raw = pl.read_csv(REAL / "esft_deepseek_v2_lite" / "routing.csv.gz")
    src = _jsonl(raw.select(req_id="request_id", token_idx="token_idx", layer="layer", topk_ids="expert_ids",
                            phase=pl.lit("prefill")), work / "esft.jsonl",
                 {"model": "ESFT-vanilla-lite", "num_experts": 64, "top_k": 6})
    dom = dict(zip(raw["request_id"].to_list(), raw["domain"].to_list()))
    out["esft"] = ("jsonl", src, ImportOptions(domains=_domains(dom, work / "esft.csv")),
                   "ESFT (DeepSeek-V2-Lite arch.), 4 tasks, 26 layers, top-6 of 64, teacher-forced")
    reqs = pl.read_csv(REAL / "gptoss20b_fingerprinting" / "requests.csv", infer_schema_length=0)
    wide = pl.read_csv(REAL / "gptoss20b_fingerprinting" / "routing_wide.csv.gz").drop("channel")
    long = wide.unpivot(index=["request_id", "token_pos"], variable_name="layer", value_name="topk_ids").select(
        req_id="request_id", token_idx="token_pos", layer=pl.col("layer").str.slice(1).cast(pl.Int64),
        topk_ids="topk_ids", phase=pl.lit("decode")).sort(["req_id", "token_idx", "layer"])
    src = _jsonl(long, work / "gptoss.jsonl", {"model": "gpt-oss-20b", "num_experts": 32, "top_k": 4})
    dom = dict(zip(reqs["request_id"].to_list(), reqs["dataset"].to_list()))
    out["gptoss"] = ("jsonl", src, ImportOptions(domains=_domains(dom, work / "gptoss.csv")),
                     "gpt-oss-20b, 435 requests (MMLU, MMLU-Pro, GPQA, SORRY-Bench, ...), generated tokens, top-4 of 32")
    raw = pl.read_csv(REAL / "mixtral8x7b_vllm_small" / "routing.csv.gz")
    src = _jsonl(raw.select(req_id="request_id", token_idx="token_idx", layer="layer", topk_ids="expert_ids",
                            phase="phase"), work / "mixtral.jsonl",
                 {"model": "Mixtral-8x7B-Instruct", "num_experts": 8, "top_k": 2})
    dom = dict(zip(raw["request_id"].to_list(), raw["domain"].to_list()))
    out["mixtral"] = ("jsonl", src, ImportOptions(domains=_domains(dom, work / "mixtral.csv")),
                      "Mixtral-8x7B on vLLM, 4 requests (HumanEval, GSM8K), top-2 of 8")
    raw = pl.read_csv(REAL / "olmoe_routing" / "expert_counts.csv")
    for model, E, what in (("olmoe", 64, "OLMoE-1B-7B, 6 pretraining domains, layers 0/7/15, top-8 of 64"),
                           ("mistral", 8, "Mixtral-8x7B, 5 pretraining domains, layers 0/7/15, top-2 of 8")):
        path = work / f"counts-{model}.csv"
        raw.filter(pl.col("model") == model).select("layer", "expert", "count", "domain").write_csv(path)
        out[f"olmoe-{model}"] = ("counts", path, ImportOptions(num_experts=E, top_k=8 if E == 64 else 2), what)
    return out


def stats_line(s: dict) -> list[str]:
    lines = []
    im = s["imbalance"]
    lines.append(f"  imbalance (max/mean over experts, whole trace): mean over layers {im['mean_max_over_mean']:.2f}, "
                 f"worst layer {im['worst_layer']['layer']} at {im['worst_layer']['max_over_mean']:.2f}; "
                 f"CV {im['mean_cv']:.2f}, dead experts {im['dead_experts']}")
    ds = s["domain_shift"]
    if ds.get("available"):
        top = max(ds["pairs"], key=lambda p: p["js_mean"])
        lines.append(f"  domain shift: JS mean {ds['js_mean']:.3f} over {len(ds['pairs'])} pairs, largest "
                     f"{top['domain_a']} vs {top['domain_b']} {top['js_mean']:.3f}; top-10% Jaccard {ds['jaccard_mean']:.2f}")
    else:
        lines.append(f"  domain shift: not available ({ds['reason']})")
    pd = s["prefill_decode"]
    if pd.get("available"):
        c = pd["controls"]
        ctrl = ", ".join(f"{k.replace('_', ' ')} {v['pearson']:.2f}" for k, v in c.items() if v.get("available"))
        lines.append(f"  prefill->decode Pearson over {pd['requests']} requests: own request {pd['pearson']:.2f} "
                     f"(controls: {ctrl or 'none, no partner request'}); "
                     f"aggregate {pd['aggregate_pearson']:.2f}; Spearman {pd['spearman']:.2f}")
    else:
        lines.append(f"  prefill->decode: not available ({pd['reason']})")
    cl = s["classification"]
    if cl.get("available"):
        lines.append(f"  domain from prefill: {cl['accuracy']:.1%} on {cl['test_requests']} held-out requests "
                     f"(chance {cl['chance']:.0%})")
    else:
        lines.append(f"  domain from prefill: not available ({cl['reason']})")
    return lines


def placement_tables(trace: Path) -> None:
    data = load_routing(Trace.open(trace), "decode")
    test = split_requests(data.num_requests, 0.3, 0)
    cfg, _ = sim_config(data, hidden_size=5120, dtype_bytes=2)
    for nodes, gpn, red in TOPOLOGIES:
        topo = build_topology(data.model.num_experts, nodes, gpn, redundant=red or None)
        print(f"\n**{nodes} nodes × {gpn} GPUs × {topo.slots_per_gpu} slots ({topo.num_redundant} redundant)**, "
              f"{int(test.sum())} held-out requests, hidden 5120 × 2 B\n")
        print("| policy | grouping | cross-node KiB/token | vs eplb | own node | held-out GPU max/mean median (p90) "
              "| whole split | train median (whole) | fit s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        base = None
        for policy, grouping, params in RUNS:
            p = fit_policy(data, ~test, topo, policy, grouping=grouping, params=params)
            m = score(data, p, test, cfg, train=~test)
            base = base or m["cross_node_bytes_per_token"]
            g, tr = m["gpu_load_max_mean"], m["train_gpu_load_max_mean"]
            name = policy + (" robust=False" if params.get("robust") is False else "")
            print(f"| {name} | {m['grouping']} | {m['cross_node_bytes_per_token'] / 1024:.1f} | "
                  f"{m['cross_node_bytes_per_token'] / base - 1:+.1%} | {m['local_node_share']:.1%} | "
                  f"{g['median']:.2f} ({g['p90']:.2f}) | {g['whole_split']:.2f} | {tr['median']:.2f} "
                  f"({tr['whole_split']:.2f}) | {p.info['fit_seconds']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=None,
                    help="where traces go, kept (default: a temporary directory, removed at exit)")
    ap.add_argument("--sets", default="llama,qwen,esft,gptoss,mixtral,olmoe-olmoe,olmoe-mistral")
    ap.add_argument("--no-placement", action="store_true")
    args = ap.parse_args()
    if not REAL.is_dir():
        raise SystemExit(f"{REAL} is absent: nothing to measure")
    scratch = None if args.work else tempfile.TemporaryDirectory(prefix="moeprof-realdata-")
    work = args.work or Path(scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    print(PUBLISHED)
    srcs = sources(work)
    unknown = [n for n in args.sets.split(",") if n not in srcs]
    if unknown:
        ap.error(f"--sets: unknown {', '.join(unknown)}; the sets are {','.join(srcs)}")
    for name in args.sets.split(","):
        fmt, src, opts, what = srcs[name]
        t0 = time.perf_counter()
        opts.force = True
        rep = import_trace(fmt, [src], work / name, opts)
        s = analyze_trace(work / name).summary
        warm = f", warm-up dropped {sum(rep.warmup.values()):,}" if rep.warmup else ""
        rows = f"{rep.routing_rows:,} routing rows" if rep.routing_rows else f"{rep.loads_rows:,} count rows"
        print(f"\n## {name}: {what}\n  import {fmt}: {rows}, {rep.requests} requests{warm} "
              f"({time.perf_counter() - t0:.0f} s with analyze)")
        print("\n".join(stats_line(s)))
        if name == "llama" and not args.no_placement:
            placement_tables(work / name)


if __name__ == "__main__":
    main()
