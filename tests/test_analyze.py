"""`moeprof analyze`: known answers on a hand-built trace, invariants, count-only traces, CLI errors."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import numpy as np
import pyarrow as pa
import pytest

from moeprof.analysis import domain as dom
from moeprof.analysis import load
from moeprof.analysis import phase as ph
from moeprof.analysis.aggregate import Selection, aggregate_routing, row_groups
from moeprof.analysis.run import analyze_trace, build_selection
from moeprof.errors import AnalysisError, UsageError
from moeprof.trace import ModelInfo, Trace, TraceWriter
from moeprof.trace.schema import LOADS_SCHEMA

# Hand-built trace, E = 8 experts, top-2, MoE layers 0 and 1:
#   layer 0: every token picks {0, 1}       -> max/mean = 1 / (2/8) = 4.0 (the E/k ceiling)
#   layer 1: code and math tokens alternate {0,1},{2,3}; chat tokens alternate {4,5},{6,7}
#            code 8 + math 8 + chat 16 tokens -> every expert 8 routes -> max/mean = 1.0
# Each request: 4 prefill tokens (one forward pass) and 4 decode steps that repeat the prefill's
# experts, so prefill and decode count vectors are equal: correlation 1.
E, K = 8, 2
MODEL = ModelInfo(name="hand", num_experts=E, top_k=K, moe_layers=[0, 1], num_layers=2)
REQUESTS = {0: "code", 1: "math", 2: "chat", 3: "chat"}


def _layer1(domain: str, n: int) -> np.ndarray:
    pairs = [[0, 1], [2, 3]] if domain in ("code", "math") else [[4, 5], [6, 7]]
    return np.array([pairs[i % 2] for i in range(n)])


def write_hand_trace(out, requests=REQUESTS, *, layers=(0, 1), moe_layers=(0, 1), shard_rows=1 << 20, **kw):
    model = ModelInfo(name="hand", num_experts=E, top_k=K, moe_layers=list(moe_layers), num_layers=max(moe_layers) + 1)
    w = TraceWriter(out, model=model, source="synthetic", shard_rows=shard_rows, **kw)
    batch = 0
    for rid, domain in requests.items():
        w.set_request(rid, domain, prompt_tokens=4, decode_tokens=4)
        steps = np.array([0, 0, 0, 0, 1, 2, 3, 4])
        batches = np.array([batch] * 4 + [batch + s for s in range(1, 5)])
        for layer in layers:
            experts = np.tile([0, 1], (8, 1)) if layer == 0 else _layer1(domain, 4)[np.r_[0:4, 0:4]]
            w.write_routing(dict(request_id=rid, step=steps, phase=(steps > 0).astype(np.int8), pos=np.arange(8),
                                 layer=layer, experts=experts, batch_id=batches))
        batch += 5
    w.close()
    return out


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    return write_hand_trace(tmp_path_factory.mktemp("hand") / "trace")


@pytest.fixture(scope="module")
def hand_analysis(hand):
    return analyze_trace(hand, batch_sizes=[1, 4])


def schema():
    return json.loads(resources.files("moeprof.schemas").joinpath("summary.schema.json").read_text())


def by_layer(rows, layer):
    return next(r for r in rows if r["layer"] == layer)


# -- known answers -----------------------------------------------------------------------------------
def test_imbalance_known_answers(hand_analysis):
    rows = hand_analysis.summary["imbalance"]["per_layer"]
    l0, l1 = by_layer(rows, 0), by_layer(rows, 1)
    assert l0["max_over_mean"] == pytest.approx(4.0)  # all load on 2 of 8 experts
    assert l1["max_over_mean"] == pytest.approx(1.0)  # uniform
    assert l0["tokens"] == l1["tokens"] == 32
    assert l0["dead"] == 6 and l1["dead"] == 0
    assert l0["hot_share"] == pytest.approx(0.5)  # top 10% = 1 expert of 8, holding 32 of 64 routes
    assert l1["hot_share"] == pytest.approx(1 / 8)
    assert l0["entropy"] == pytest.approx(np.log(2) / np.log(8))
    assert l1["entropy"] == pytest.approx(1.0) and l1["cv"] == pytest.approx(0.0) and l1["gini"] == pytest.approx(0.0)
    assert l0["cv"] == pytest.approx(np.std([16, 16, 0, 0, 0, 0, 0, 0]) / 4)
    assert l0["gini"] == pytest.approx(0.75)  # 2 of 8 experts hold everything: 1 - 2/8


def test_imbalance_metrics_vectorised():
    m = load.imbalance(np.array([[4, 1, 1, 1, 1], [0, 0, 0, 0, 0]]))
    assert m["max_over_mean"][0] == pytest.approx(4 / 1.6)
    assert np.isnan(m["max_over_mean"][1]) and m["dead"][1] == 5


def test_batch_of_one_token_reads_e_over_k(hand_analysis):
    b = {r["batch_size"]: r for r in hand_analysis.summary["batch_imbalance"]["batches"]}
    assert b[1]["median"] == pytest.approx(E / K) and b[1]["p90"] == pytest.approx(E / K)
    assert b[1]["median_ci"] == [pytest.approx(4.0), pytest.approx(4.0)]
    assert "batch_id" in hand_analysis.summary["batch_imbalance"]["method"]
    assert hand_analysis.summary["batch_imbalance"]["whole_trace"] is True


def test_domain_shift_identical_is_zero_disjoint_is_one(hand_analysis):
    shift = hand_analysis.tables["domain_shift"]
    js = {(r["layer"], r["domain_a"], r["domain_b"]): r for r in shift.to_dicts()}
    assert js[(1, "code", "math")]["js"] == pytest.approx(0.0, abs=1e-12)
    assert js[(1, "chat", "code")]["js"] == pytest.approx(1.0)
    assert js[(0, "chat", "code")]["js"] == pytest.approx(0.0, abs=1e-12)
    assert js[(1, "chat", "code")]["jaccard"] == 0.0 and js[(1, "code", "math")]["jaccard"] == 1.0
    lift = hand_analysis.tables["domain_experts"].filter(
        (hand_analysis.tables["domain_experts"]["layer"] == 1) & (hand_analysis.tables["domain_experts"]["domain"] == "chat")
    )
    # chat holds half of layer 1's routes, all on experts 4-7: lift 0.25 / 0.125 = 2, not > 2
    assert lift.filter(lift["expert"] == 4)["lift"].item() == pytest.approx(2.0)
    assert not lift["specialist"].any()
    code = hand_analysis.tables["domain_experts"].filter(
        (hand_analysis.tables["domain_experts"]["layer"] == 1) & (hand_analysis.tables["domain_experts"]["domain"] == "code")
    )
    # code: 8 tokens on experts 0-3 -> p = 0.25 each vs 0.125 overall: lift 2.0
    assert code.filter(code["expert"] == 0)["lift"].item() == pytest.approx(2.0)


def test_js_and_jaccard_functions():
    p = np.array([0.5, 0.5, 0, 0])
    assert dom.js_divergence(p, p) == pytest.approx(0.0)
    assert dom.js_divergence(p, p[::-1]) == pytest.approx(1.0)
    assert dom.js_divergence(np.array([1.0, 0]), np.array([0.5, 0.5])) == pytest.approx(0.3112781, abs=1e-6)


def test_decode_repeating_prefill_correlates_one(hand_analysis):
    pd = hand_analysis.summary["prefill_decode"]
    layer1 = by_layer(pd["per_layer"], 1)
    assert layer1["pearson"] == pytest.approx(1.0) and layer1["spearman"] == pytest.approx(1.0)
    assert layer1["requests"] == 4
    # summed over requests, layer 1 is uniform: a constant vector has no correlation (null, never 0)
    assert layer1["aggregate_pearson"] is None
    assert by_layer(pd["per_layer"], 0)["aggregate_pearson"] == pytest.approx(1.0)
    assert by_layer(pd["per_layer"], 0)["pearson"] == pytest.approx(1.0)
    assert layer1[f"recall_at_{K}"] == pytest.approx(1.0)
    # controls: the other chat request has the same vectors (1.0); code vs math too; other domain: disjoint
    assert layer1["same_domain_pearson"] == pytest.approx(1.0)
    assert layer1["other_domain_pearson"] < 0
    reqs = hand_analysis.tables["prefill_decode_requests"]
    assert sorted(reqs["request_id"].unique().to_list()) == [0, 1, 2, 3]


def test_correlation_functions_on_hand_vectors():
    x = np.array([3.0, 2, 1, 0])
    assert ph.pearson(x, x) == pytest.approx(1.0)
    assert ph.pearson(x, -x) == pytest.approx(-1.0)
    assert ph.spearman(x, x ** 2) == pytest.approx(1.0)
    assert np.isnan(ph.pearson(x, np.zeros(4)))
    assert ph.recall_at(x, np.array([0, 1, 2, 3.0]), 2) == pytest.approx(0.0)
    assert ph.recall_at(x, np.array([2, 3, 0, 0.0]), 2) == pytest.approx(1.0)


def test_coactivation_counts_by_hand(hand, hand_analysis):
    # every pair here is each of its experts' most frequent one, every transition ties: top tables = full ones
    full = analyze_trace(hand, batch_sizes=[1, 4], coactivation_tables="full")
    assert full.summary == hand_analysis.summary
    assert full.tables["coactivation_pairs"].equals(hand_analysis.tables["coactivation_pairs_top"])
    assert full.tables["transitions"].equals(hand_analysis.tables["transitions_top"])
    pairs = full.tables["coactivation_pairs"]
    got = {(r["layer"], r["expert_a"], r["expert_b"]): r["count"] for r in pairs.to_dicts()}
    assert got == {(0, 0, 1): 32, (1, 0, 1): 8, (1, 2, 3): 8, (1, 4, 5): 8, (1, 6, 7): 8}
    trans = full.tables["transitions"]
    t = {(r["expert"], r["next_expert"]): (r["count"], r["p_next_given_expert"]) for r in trans.to_dicts()}
    # every token goes 0 and 1 in layer 0; each layer-1 expert takes 8 of the 32 tokens
    assert t[(0, 5)] == (8, pytest.approx(0.25)) and t[(1, 7)] == (8, pytest.approx(0.25))
    assert len(t) == 2 * 8
    co = hand_analysis.summary["coactivation"]
    assert co["whole_trace"] is True and co["tokens"] == 32


def test_classification_needs_two_requests_per_domain(hand_analysis):
    c = hand_analysis.summary["classification"]
    assert c == {"available": False, "reason": c["reason"]}
    assert "two or more requests" in c["reason"] and "code 1" in c["reason"]


def test_summary_matches_schema(hand_analysis):
    jsonschema.validate(hand_analysis.summary, schema())


# -- invariants ------------------------------------------------------------------------------------
def test_merging_shards_equals_one_pass(tmp_path):
    from moeprof.synthetic import generate_trace

    trace = generate_trace(tmp_path / "t", num_requests=12, num_layers=3, num_experts=16, top_k=2,
                           prompt_tokens=(8, 16), decode_tokens=(4, 8), shard_rows=200, seed=3)
    sel = build_selection(trace, None, None, seed=0, sample_tokens=1 << 20)
    units = row_groups(trace)
    assert len(units) >= 4
    whole = aggregate_routing(trace, sel, units=units, threads=2)
    a = aggregate_routing(trace, sel, units=units[: len(units) // 2], threads=1)
    b = aggregate_routing(trace, sel, units=units[len(units) // 2 :], threads=1)
    a += b
    for name in ("domains", "sampled", "seen"):
        np.testing.assert_array_equal(getattr(a, name), getattr(whole, name))
    assert a.rows == whole.rows == trace.num_routing_rows

    def rows(s):
        order = np.lexsort((s.layer, s.token))
        return s.token[order], s.layer[order], s.experts[order]

    for x, y in zip(rows(a.sample), rows(whole.sample)):
        np.testing.assert_array_equal(x, y)
    # counts add up to k routes per row
    assert whole.domains.sum() == whole.sampled.sum() == trace.num_routing_rows * 2


def test_sampled_analysis_is_seeded_and_bounded(tmp_path):
    from moeprof.synthetic import generate_trace

    generate_trace(tmp_path / "t", num_requests=40, num_layers=2, num_experts=16, top_k=2, seed=5)
    one = analyze_trace(tmp_path / "t", sample_tokens=500, batch_sizes=[8, 64])
    two = analyze_trace(tmp_path / "t", sample_tokens=500, batch_sizes=[8, 64])
    assert one.summary == two.summary
    assert one.summary["coactivation"]["whole_trace"] is False
    assert one.summary["coactivation"]["tokens"] <= 500
    # the whole-trace counts do not depend on the sample
    full = analyze_trace(tmp_path / "t", batch_sizes=[8])
    assert one.summary["imbalance"] == full.summary["imbalance"]


def test_planted_structure_is_found(tmp_path):
    from moeprof.synthetic import generate_trace

    generate_trace(tmp_path / "t", num_requests=48, num_layers=2, num_experts=16, top_k=2,
                   domain_strength=0.9, request_strength=0.5, seed=2)
    s = analyze_trace(tmp_path / "t", batch_sizes=[1, 16]).summary
    jsonschema.validate(s, schema())
    assert s["classification"]["accuracy"] >= 0.9
    pd = s["prefill_decode"]
    assert pd["pearson"] > pd["controls"]["same_domain"]["pearson"] > pd["controls"]["other_domain"]["pearson"]
    assert s["domain_shift"]["js_mean"] > 0.1


# -- partial traces ----------------------------------------------------------------------------------
def test_count_only_trace_gets_what_counts_allow(tmp_path):
    w = TraceWriter(tmp_path / "c", model=MODEL, source="counts",
                    missing={"per_token": "the recorder keeps per-expert counts only",
                             "request_ids": "counts are aggregated over requests"})
    rows = []
    for window in range(3):
        for e in range(E):
            rows.append(dict(window=window, phase="decode", layer=0, expert=e, count=16 if e < 2 else 0,
                             request_id=None, domain="code"))
            rows.append(dict(window=window, phase="decode", layer=1, expert=e, count=4, request_id=None,
                             domain="code" if e < 4 else "chat"))
    table = pa.Table.from_pylist(rows, schema=pa.schema([f.with_type(pa.string()) if f.name == "phase" else f
                                                         for f in LOADS_SCHEMA]))
    w.write_loads(table)
    w.close()
    a = analyze_trace(tmp_path / "c")
    s = a.summary
    jsonschema.validate(s, schema())
    rows = s["imbalance"]["per_layer"]
    assert by_layer(rows, 0)["max_over_mean"] == pytest.approx(4.0)
    assert by_layer(rows, 1)["max_over_mean"] == pytest.approx(1.0)
    assert s["trace"]["per_token"] is False
    for key in ("batch_imbalance", "coactivation"):
        assert s[key]["available"] is False
        assert "count tables only" in s[key]["reason"] and "per-token routing rows" in s[key]["reason"]
    assert s["batch_imbalance"]["source_windows"]["windows"] == 3
    # pooled over (window, layer): three 4.0s (layer 0) and three 1.0s (layer 1)
    assert s["batch_imbalance"]["source_windows"]["median"] == pytest.approx(2.5)
    assert s["batch_imbalance"]["source_windows"]["p90"] == pytest.approx(4.0)
    for key in ("prefill_decode", "classification"):
        assert s[key]["available"] is False
    assert "request_ids: counts are aggregated over requests" in s["prefill_decode"]["reason"]
    js = {(r["layer"], r["domain_a"], r["domain_b"]): r["js"] for r in a.tables["domain_shift"].to_dicts()}
    assert js[(1, "chat", "code")] == pytest.approx(1.0)


def test_no_phase_means_no_prefill_decode(tmp_path):
    write_hand_trace(tmp_path / "t", missing={"phase": "the engine dump has no phase"})
    s = analyze_trace(tmp_path / "t", batch_sizes=[1]).summary
    assert s["prefill_decode"] == {
        "available": False,
        "reason": "the trace does not record prefill/decode phase (phase: the engine dump has no phase)",
    }
    assert s["classification"]["available"] is False
    assert s["imbalance"]["available"] is True


def test_single_request_says_what_cannot_be_computed(tmp_path, cli):
    write_hand_trace(tmp_path / "t", requests={0: "code"})
    s = analyze_trace(tmp_path / "t", batch_sizes=[1]).summary
    jsonschema.validate(s, schema())
    assert s["prefill_decode"]["available"] is True and s["prefill_decode"]["requests"] == 1
    same = s["prefill_decode"]["controls"]["same_domain"]
    assert same == {"available": False, "reason": "no domain has two requests with both prefill and decode tokens "
                                                  "(the selection holds a single request)"}
    assert s["domain_shift"] == {"available": False, "reason": "only one domain (code) has routed tokens in the "
                                                              "selection; domain shift compares two or more"}
    r = cli("analyze", tmp_path / "t")
    assert r.exit_code == 0, r.stderr
    assert "Domain shift: not available: only one domain (code)" in r.stdout
    assert "(the selection holds a single request)" in r.stdout


def test_layer_without_tokens(tmp_path, cli):
    out = write_hand_trace(tmp_path / "t", layers=(0, 1), moe_layers=(0, 1, 2))
    s = analyze_trace(out, batch_sizes=[1]).summary
    assert s["selection"]["layers"] == [0, 1]
    assert "MoE layers 2 have no routed tokens in this trace and are left out" in s["notes"]
    r = cli("analyze", out, "--layers", "1-2")
    assert r.exit_code == 2
    assert f"Error: --layers: layer 2 has no routed tokens in {out} (layers with tokens: 1)" in r.stderr.replace("\n", "")


# -- CLI -------------------------------------------------------------------------------------------------
def test_cli_writes_outputs_that_validate(hand, tmp_path, cli):
    out = tmp_path / "a"
    r = cli("analyze", hand, "--out", out, "--batch-sizes", "1,4", "--layers", "0-1")
    assert r.exit_code == 0, r.stderr
    assert "Load imbalance per layer" in r.stdout and "4.00" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    jsonschema.validate(summary, schema())
    for name in ("load_heatmap", "imbalance_vs_batch", "domain_js", "domain_popularity", "prefill_decode", "transitions"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
        assert (out / "plots" / f"{name}.svg").exists()
    import polars as pl

    t = pl.read_parquet(out / "tables" / "layer_imbalance.parquet")
    assert t["max_over_mean"].to_list() == pytest.approx([4.0, 1.0])
    r = cli("analyze", hand, "--out", out)
    assert r.exit_code == 2 and f"Error: {out} already exists; pass --force to replace it" in r.stderr.replace("\n", "")
    assert cli("analyze", hand, "--out", out, "--force", "--batch-sizes", "1").exit_code == 0


def test_cli_figures_only_in_the_formats_asked_for(hand, tmp_path, cli):
    """--figures png writes PNGs only, none writes no figure (and lists none in summary.json's
    outputs); the statistics and tables are the same."""
    png, none = tmp_path / "png", tmp_path / "none"
    assert cli("analyze", hand, "--out", png, "--figures", "png", "--batch-sizes", "1").exit_code == 0
    assert cli("analyze", hand, "--out", none, "--figures", "none", "--batch-sizes", "1").exit_code == 0
    assert sorted(p.suffix for p in (png / "plots").iterdir()) == [".png"] * 6
    assert not (none / "plots").exists()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (png, none))
    assert not [o for o in b["outputs"] if "plots/" in o] and [o for o in a["outputs"] if o.endswith(".png")]
    for s in (a, b):
        s.pop("outputs"), s.pop("run", None), s.pop("generated_at", None)
    assert a == b
    r = cli("analyze", hand, "--out", tmp_path / "bad", "--figures", "jpg")
    assert r.exit_code == 2 and "--figures: 'jpg': give png, svg, png,svg or none" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_cli_json_format(hand, cli):
    r = cli("analyze", hand, "--json", "--domains", "code,math", "--batch-sizes", "1")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["selection"]["domains"] == ["code", "math"]
    assert s["trace"]["tokens"] == 16
    jsonschema.validate(s, schema())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "7"], "Error: --layers: 7 is not a MoE layer of this model (MoE layers: 0-1)"),
        (["--layers", "0,x"], "Error: --layers: 'x' is not a layer number or a range like 3-5"),
        (["--layers", "1-0"], "Error: --layers: range '1-0' runs backwards; write it as 0-1"),
        (["--domains", ","], "Error: --domains selects no domain; give names separated by commas, e.g. --domains code,math"),
        (["--domains", "code,poetry"], "Error: --domains: no request has domain 'poetry' (domains in the trace: chat, code, math)"),
        (["--batch-sizes", "0,8"], "Error: --batch-sizes: '0,8': give positive integers, e.g. 1,8,64,512,4096"),
    ],
)
def test_cli_errors(hand, cli, args, message):
    r = cli("analyze", hand, *args)
    assert r.exit_code == 2
    assert r.stderr.strip().replace("\n", "") == message
    assert "Traceback" not in r.stderr


def test_library_errors_are_typed(hand, tmp_path):
    with pytest.raises(UsageError):
        analyze_trace(hand, layers=[9])
    empty = TraceWriter(tmp_path / "e", model=MODEL, source="hf")
    empty.close()
    with pytest.raises(AnalysisError, match="no routing rows and no count tables"):
        analyze_trace(tmp_path / "e")


def test_average_ranks_match_scipy_with_ties():
    from scipy.stats import rankdata

    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, size=(5, 3, 16))  # many ties, as in expert counts
    assert np.array_equal(ph.average_ranks(x), rankdata(-x, axis=-1).astype(np.float32))
