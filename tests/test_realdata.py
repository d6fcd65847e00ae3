"""Golden tests on routing recorded by others from real models (``../shared/realdata``, see its README).

Each set is imported through a moeprof importer (the expert-selection tarball and the vLLM logs as
they are; the published long/wide CSV tables converted in the test to per-token JSONL or to a counts
table, the formats moeprof documents), analysed with :func:`analyze_trace`, and every statistic checked
against the same quantity computed here from the raw files with plain numpy: imbalance per layer
(max/mean), domain Jensen-Shannon divergence, prefill->decode Pearson (per request and aggregate),
domain classification from prefill counts. Large sets are subsampled deterministically (named layers,
every n-th request) to keep the file to a few tens of seconds. Skipped when the folder is absent, as
in a user's clone.
"""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} is absent (real routing data is not shipped)")

TOL = 1e-6


# -- plain-numpy statistics, written from DESIGN.md "Statistics" ---------------------------------------
def counts_of(layer_idx: np.ndarray, experts: np.ndarray, L: int, E: int) -> np.ndarray:
    """``[L, E]`` token-routes from rows (layer index ``[n]``, expert ids ``[n, k]``)."""
    out = np.zeros((L, E))
    np.add.at(out, (np.repeat(layer_idx, experts.shape[1]), experts.ravel()), 1)
    return out


def max_over_mean(c: np.ndarray) -> np.ndarray:
    return c.max(-1) / c.mean(-1)


def js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence, base 2, of count vectors along the last axis."""
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    m = (p + q) / 2

    def kl(a):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / m), 0.0).sum(-1)

    return 0.5 * kl(p) + 0.5 * kl(q)


def mean_pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over layers of the mean over requests of Pearson(x[r, l], y[r, l]); constant vectors left out."""
    per_layer = []
    for li in range(x.shape[1]):
        vals = [np.corrcoef(x[r, li], y[r, li])[0, 1] for r in range(x.shape[0])
                if x[r, li].std() > 0 and y[r, li].std() > 0]
        if vals:
            per_layer.append(np.mean(vals))
    return float(np.mean(per_layer))


def aggregate_pearson(x: np.ndarray, y: np.ndarray) -> float:
    sx, sy = x.sum(0), y.sum(0)
    return float(np.mean([np.corrcoef(sx[li], sy[li])[0, 1] for li in range(x.shape[1])]))


def centroid_accuracy(x: np.ndarray, dom: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Nearest L2-normalised centroid of per-layer L2-normalised prefill counts ``x[R, L, E]``."""
    f = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-300)
    f = f.reshape(len(f), -1)
    classes = np.unique(dom)
    cent = np.stack([f[train][dom[train] == c].mean(0) for c in classes])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    pred = classes[np.argmax(f[test] @ cent.T, axis=1)]
    return float((pred == dom[test]).mean())


def stratified_accuracy(x: np.ndarray, dom: np.ndarray, seeds=range(5), test_fraction: float = 0.3) -> list[float]:
    out = []
    for s in seeds:
        rng = np.random.default_rng(1000 + s)
        test = np.zeros(len(dom), bool)
        for d in np.unique(dom):
            idx = rng.permutation(np.flatnonzero(dom == d))
            test[idx[: max(1, round(test_fraction * len(idx)))]] = True
        out.append(centroid_accuracy(x, dom, ~test, test))
    return out


# -- conversions of the published tables into formats moeprof documents -----------------------------------
def to_jsonl(df: pl.DataFrame, path: Path, meta: dict) -> Path:
    """Long table (req_id, token_idx, layer, ids "a b c"[, phase]) -> per-token JSONL with a meta line."""
    df = df.with_columns(pl.col("topk_ids").str.split(" ").cast(pl.List(pl.Int64)))
    with open(path, "w") as fh:
        fh.write(json.dumps(meta) + "\n")
    with open(path, "a") as fh:
        fh.write(df.write_ndjson())
    return path


def domain_csv(pairs: dict[str, str], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["request_id", "domain"])
        w.writerows(sorted(pairs.items()))
    return path


def run_import(fmt, src, out, **opts):
    from moeprof.importers import ImportOptions, import_trace

    return import_trace(fmt, [src], out, ImportOptions(**opts))


def run_analyze(trace):
    from moeprof.analysis.run import analyze_trace

    return analyze_trace(trace).summary


def per_layer(summary, key="max_over_mean"):
    return {r["layer"]: r[key] for r in summary["imbalance"]["per_layer"]}


def js_pairs(summary):
    return {(p["domain_a"], p["domain_b"]): p["js_mean"] for p in summary["domain_shift"]["pairs"]}


def check_counts_stats(summary, layers, counts, dom_counts=None):
    """Imbalance per layer and pairwise domain JS of ``summary`` against ``counts[L, E]`` / ``dom_counts``."""
    got = per_layer(summary)
    want = max_over_mean(counts)
    assert sorted(got) == list(layers)
    for li, lay in enumerate(layers):
        assert got[lay] == pytest.approx(want[li], rel=TOL), lay
    if dom_counts is not None:
        pairs = js_pairs(summary)
        names = sorted(dom_counts)
        assert len(pairs) == len(names) * (len(names) - 1) // 2
        for a_i, a in enumerate(names):
            for b in names[a_i + 1:]:
                assert pairs[(a, b)] == pytest.approx(js(dom_counts[a], dom_counts[b]).mean(), rel=1e-5), (a, b)


# -- Llama-4-Maverick on MMLU: the expert-selection tarball as published ---------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    src = REAL / "llama4_maverick_mmlu" / "original.tar.gz"
    out = tmp_path_factory.mktemp("llama") / "trace"
    rep = run_import("auto", src, out, num_experts=128)
    # raw: every file of the tarball read here with the stdlib, counts per request and phase
    E, reqs = 128, []
    with tarfile.open(src) as tf:
        for m in tf:
            if not m.isfile():
                continue
            steps = json.load(tf.extractfile(m))
            moe = sorted(int(k) for k, v in steps[0].items() if v is not None)
            flat = [(min(i, 1) * len(moe) + li) * E + e
                    for i, step in enumerate(steps) for li, lay in enumerate(moe)
                    for ids in step[str(lay)] for e in ids]
            c = np.bincount(flat, minlength=2 * len(moe) * E).reshape(2, len(moe), E).astype(float)
            reqs.append((m.name.split("/")[-2].removeprefix("llama4-mmlu-"), c))
    return rep, out, moe, reqs


def test_llama4_import_matches_the_raw_files(llama):
    rep, out, moe, reqs = llama
    assert rep.format == "expert-selection" and rep.requests == len(reqs) == 387
    n_rows = int(sum(c.sum() for _, c in reqs))
    assert rep.routing_rows == n_rows and not rep.warmup
    from moeprof.trace.reader import Trace

    m = Trace.open(out).manifest
    assert m.model.moe_layers == moe == list(range(1, 48, 2)) and m.model.top_k == 1
    req = Trace.open(out).requests()
    assert sorted(set(req["domain"].to_list())) == ["abstract_algebra", "anatomy", "astronomy"]
    # the long table published beside the tarball agrees with what was imported
    long = pl.read_csv(REAL / "llama4_maverick_mmlu" / "routing.csv.gz", columns=["phase"])
    assert long.height == n_rows
    assert (long["phase"] == "prefill").sum() == int(sum(c[0].sum() for _, c in reqs))


def test_llama4_statistics(llama):
    rep, out, moe, reqs = llama
    s = run_analyze(out)
    doms = np.array([d for d, _ in reqs])
    pre = np.stack([c[0] for _, c in reqs])  # [R, L, E]
    dec = np.stack([c[1] for _, c in reqs])
    total = (pre + dec).sum(0)
    dom_counts = {d: (pre + dec)[doms == d].sum(0) for d in np.unique(doms)}
    check_counts_stats(s, moe, total, dom_counts)
    # layer 45 sends almost every token to expert 40, as published
    assert per_layer(s)[45] > 120 and total[moe.index(45)].argmax() == 40
    pd = s["prefill_decode"]
    assert pd["pearson"] == pytest.approx(mean_pearson(pre, dec), abs=1e-4)
    assert pd["aggregate_pearson"] == pytest.approx(aggregate_pearson(pre, dec), abs=1e-4)
    # controls: a request's own decode correlates more with its prefill than a same-domain request's
    assert pd["pearson"] > pd["controls"]["same_domain"]["pearson"] > pd["controls"]["other_domain"]["pearson"]
    acc = stratified_accuracy(pre, doms)
    c = s["classification"]
    assert c["available"] and min(acc) - 0.03 <= c["accuracy"] <= max(acc) + 0.03
    assert c["accuracy"] > 0.94  # the seed paper's "> 94%" holds on this set


def test_llama4_placement_bound_holds_on_held_out_requests(llama):
    """4 nodes × 8 GPUs, 32 redundant slots: locality's held-out load stays at eplb's (micro-batch
    median) and under it (whole split) while it sends far fewer cross-node bytes; the train load is
    reported next to the held-out one."""
    from moeprof.placement.run import compare

    _, out, _, _ = llama
    cmp = compare(out, nodes=4, gpus_per_node=8, redundant=32, hidden_size=5120, dtype_bytes=2,
                  runs=(("eplb", None), ("locality", None)))
    rows = {r["key"]: r for r in cmp.rows}
    eplb, loc = rows["eplb"], rows["locality"]
    for r in (eplb, loc):
        assert r["requests"] == 116 and "train_gpu_load_max_mean" in r
    bound = loc["info"]["load_bound_per_layer_mean"]
    held, held_eplb = loc["gpu_load_max_mean"], eplb["gpu_load_max_mean"]
    assert held["whole_split"] <= bound and held["whole_split"] <= held_eplb["whole_split"]
    assert held["median"] <= held_eplb["median"] and held["p90"] <= held_eplb["p90"]
    assert loc["cross_node_bytes_per_token"] < 0.7 * eplb["cross_node_bytes_per_token"]


# -- vLLM-MoE-Logger, Qwen1.5-MoE: warm-up under the one request id ------------------------------------------
@pytest.mark.parametrize("layer", [0, 8, 12, 18, 23])
def test_qwen_vllm_log_warmup_and_imbalance(tmp_path, layer):
    src = REAL / "vllm_moe_logger_qwen15" / f"qwen15moe_gsm8k_layer{layer}.jsonl"
    rep = run_import("auto", src, tmp_path / "t", drop_warmup=True, num_experts=60)
    # independent: split the route records where token_idx restarts; a pass whose every record has the
    # same ids and weights is a dummy one
    recs = [json.loads(x) for x in src.read_text().splitlines()]
    recs = [r for r in recs if r.get("type") == "route"]
    passes, cur = [], []
    for r in recs:
        if cur and r["token_idx"] <= cur[-1]["token_idx"]:
            passes.append(cur)
            cur = []
        cur.append(r)
    passes.append(cur)
    dummy = [p for p in passes if len(p) >= 4 and all(
        (q["topk_ids"], q["topk_weights"]) == (p[0]["topk_ids"], p[0]["topk_weights"]) for q in p)]
    real = [r for p in passes if p not in dummy for r in p]
    assert len(recs) == 12805 and sum(map(len, dummy)) == 8448 and len(real) == 4357
    assert rep.routing_rows == len(real) and sum(rep.warmup.values()) == 8448
    counts = counts_of(np.zeros(len(real), int), np.array([r["topk_ids"] for r in real]), 1, 60)
    check_counts_stats(run_analyze(tmp_path / "t"), [layer], counts)


# -- ESFT (DeepSeek-V2-Lite architecture): one teacher-forced pass per sample --------------------------------
ESFT_LAYERS = [1, 7, 13, 19, 26]


@pytest.fixture(scope="module")
def esft(tmp_path_factory):
    d = tmp_path_factory.mktemp("esft")
    raw = pl.read_csv(REAL / "esft_deepseek_v2_lite" / "routing.csv.gz").filter(pl.col("layer").is_in(ESFT_LAYERS))
    src = to_jsonl(raw.select(req_id="request_id", token_idx="token_idx", layer="layer", topk_ids="expert_ids",
                              phase=pl.lit("prefill")),
                   d / "esft.jsonl", {"model": "ESFT-vanilla-lite", "num_experts": 64, "top_k": 6})
    dom = dict(zip(raw["request_id"].to_list(), raw["domain"].to_list()))
    rep = run_import("jsonl", src, d / "trace", domains=domain_csv(dom, d / "d.csv"))
    return raw, rep, d / "trace"


def test_esft_statistics(esft):
    raw, rep, trace = esft
    assert rep.routing_rows == raw.height and rep.requests == 213
    ids = np.array([list(map(int, s.split())) for s in raw["expert_ids"]])
    li = np.searchsorted(ESFT_LAYERS, raw["layer"].to_numpy())
    doms = raw["domain"].to_numpy()
    dom_counts = {d: counts_of(li[doms == d], ids[doms == d], len(ESFT_LAYERS), 64) for d in np.unique(doms)}
    s = run_analyze(trace)
    check_counts_stats(s, ESFT_LAYERS, counts_of(li, ids, len(ESFT_LAYERS), 64), dom_counts)
    # domain from the (teacher-forced) pass: requests share a task's prompt template, so it is easy
    req = raw["request_id"].to_numpy()
    names = np.unique(req)
    x = np.zeros((len(names), len(ESFT_LAYERS), 64))
    np.add.at(x, (np.repeat(np.searchsorted(names, req), 6), np.repeat(li, 6), ids.ravel()), 1)
    rdom = np.array([d for d in pl.DataFrame({"r": req, "d": doms}).unique("r").sort("r")["d"]])
    # analyze classifies from prefill counts of requests that also decode; this set has one pass only
    c = s["classification"]
    assert not c["available"] and "prefill and decode" in c["reason"]
    # what a nearest-centroid over the pass would reach (quoted in the README)
    assert min(stratified_accuracy(x, rdom)) > 0.9


def test_esft_placement_on_prefill(esft):
    from moeprof.placement.run import compare

    _, _, trace = esft
    cmp = compare(trace, nodes=2, gpus_per_node=4, phase="prefill", runs=(("eplb", None), ("locality", None)))
    rows = {r["key"]: r for r in cmp.rows}
    assert set(rows) == {"eplb", "locality"}
    assert rows["locality"]["cross_node_bytes_per_token"] < rows["eplb"]["cross_node_bytes_per_token"]


# -- gpt-oss-20b: decode tokens of 435 requests (every 3rd request, 3 layers) ---------------------------------
GPTOSS_LAYERS = [0, 12, 23]


def test_gptoss_statistics_and_placement(tmp_path):
    from moeprof.placement.run import compare

    reqs = pl.read_csv(REAL / "gptoss20b_fingerprinting" / "requests.csv", infer_schema_length=0)
    wide = pl.read_csv(REAL / "gptoss20b_fingerprinting" / "routing_wide.csv.gz",
                       columns=["request_id", "token_pos"] + [f"L{i}" for i in GPTOSS_LAYERS])
    wide = wide.filter(pl.col("request_id") % 3 == 0)
    long = wide.unpivot(index=["request_id", "token_pos"], variable_name="layer", value_name="topk_ids").select(
        req_id="request_id", token_idx="token_pos", layer=pl.col("layer").str.slice(1).cast(pl.Int64),
        topk_ids="topk_ids", phase=pl.lit("decode")).sort(["req_id", "token_idx", "layer"])
    src = to_jsonl(long, tmp_path / "g.jsonl", {"model": "gpt-oss-20b", "num_experts": 32, "top_k": 4})
    dom = dict(zip(reqs["request_id"].to_list(), reqs["dataset"].to_list()))
    rep = run_import("jsonl", src, tmp_path / "t", domains=domain_csv(dom, tmp_path / "d.csv"))
    assert rep.routing_rows == long.height
    ids = np.array([list(map(int, s.split())) for s in long["topk_ids"]])
    li = np.searchsorted(GPTOSS_LAYERS, long["layer"].to_numpy())
    ds = np.array([dom[str(r)] for r in long["req_id"].to_list()])
    dom_counts = {d: counts_of(li[ds == d], ids[ds == d], len(GPTOSS_LAYERS), 32) for d in np.unique(ds)}
    s = run_analyze(tmp_path / "t")
    check_counts_stats(s, GPTOSS_LAYERS, counts_of(li, ids, len(GPTOSS_LAYERS), 32), dom_counts)
    assert not s["prefill_decode"]["available"]  # generated tokens only: nothing to correlate with
    cmp = compare(tmp_path / "t", nodes=2, gpus_per_node=4, runs=(("eplb", None), ("linear", None)))
    assert {r["key"] for r in cmp.rows} == {"eplb", "linear"}
    rows = {r["key"]: r for r in cmp.rows}
    assert rows["eplb"]["gpu_load_max_mean"]["whole_split"] <= rows["linear"]["gpu_load_max_mean"]["whole_split"]


# -- Mixtral-8x7B on vLLM: four requests, one with its prefill ----------------------------------------------
def test_mixtral_small_statistics_and_placement(tmp_path):
    from moeprof.placement.run import compare

    raw = pl.read_csv(REAL / "mixtral8x7b_vllm_small" / "routing.csv.gz")
    src = to_jsonl(raw.select(req_id="request_id", token_idx="token_idx", layer="layer", topk_ids="expert_ids",
                              phase="phase"),
                   tmp_path / "m.jsonl", {"model": "Mixtral-8x7B-Instruct", "num_experts": 8, "top_k": 2})
    dom = dict(zip(raw["request_id"].to_list(), raw["domain"].to_list()))
    rep = run_import("jsonl", src, tmp_path / "t", domains=domain_csv(dom, tmp_path / "d.csv"))
    assert rep.routing_rows == raw.height and rep.requests == 4
    layers = sorted(set(raw["layer"].to_list()))
    ids = np.array([list(map(int, s.split())) for s in raw["expert_ids"]])
    li = np.searchsorted(layers, raw["layer"].to_numpy())
    ds = raw["domain"].to_numpy()
    dom_counts = {d: counts_of(li[ds == d], ids[ds == d], len(layers), 8) for d in np.unique(ds)}
    check_counts_stats(run_analyze(tmp_path / "t"), layers, counts_of(li, ids, len(layers), 8), dom_counts)
    cmp = compare(tmp_path / "t", nodes=2, gpus_per_node=2, test_fraction=0.5, runs=(("eplb", None),))
    assert cmp.rows[0]["requests"] == 2


# -- OLMoE and Mixtral per-domain counts (a counts table) ---------------------------------------------------
@pytest.mark.parametrize("model,E", [("olmoe", 64), ("mistral", 8)])
def test_olmoe_counts_statistics(tmp_path, model, E):
    raw = pl.read_csv(REAL / "olmoe_routing" / "expert_counts.csv").filter(pl.col("model") == model)
    src = tmp_path / "c.csv"
    raw.select("layer", "expert", "count", "domain").write_csv(src)
    rep = run_import("auto", src, tmp_path / "t", num_experts=E)
    assert rep.format == "counts" and rep.loads_rows == raw.height
    layers = sorted(set(raw["layer"].to_list()))
    doms = sorted(set(raw["domain"].to_list()))
    dom_counts = {}
    for d in doms:
        c = np.zeros((len(layers), E))
        sub = raw.filter(pl.col("domain") == d)
        np.add.at(c, (np.searchsorted(layers, sub["layer"].to_numpy()), sub["expert"].to_numpy()),
                  sub["count"].to_numpy())
        dom_counts[d] = c
    s = run_analyze(tmp_path / "t")
    check_counts_stats(s, layers, sum(dom_counts.values()), dom_counts)
