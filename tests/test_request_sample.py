"""The request sample (``--sample-requests``): per-request statistics on a seeded bottom-k of requests,
everything else exact over every row, the same on every engine.

- N >= requests: every output equals the unsampled analysis (``whole_trace: true``);
- N < requests: the sampled set is the bottom-k by a hash recomputed here in plain Python; sums
  (expert loads, domain counts, request counts) equal counts taken from the raw rows with polars;
  classification and prefill->decode equal an analysis of a trace holding only the sampled requests,
  and the per-request correlations equal plain numpy on those requests' counts;
- the row-group pass (dense and sparse request bins) and the shard path merge to the same arrays;
- a bad value is a clear error.
"""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from moeprof.analysis import run as analysis_run
from moeprof.analysis.aggregate import aggregate_routing
from moeprof.analysis.engine import LocalEngine
from moeprof.analysis.run import analyze, analyze_trace, build_selection
from moeprof.analysis.shards import aggregate_shards
from moeprof.errors import UsageError
from moeprof.synthetic import generate_trace
from moeprof.trace import Trace, TraceWriter

M64 = (1 << 64) - 1
SAMPLE_KEYS = ("requests_in_trace", "whole_trace", "sample_note")


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser on Python ints (independent of the library's numpy version)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def bottom_k(request_ids: list[int], k: int, seed: int) -> set[int]:
    """The documented rule: the k requests with the smallest hash of (seed, request id)."""
    salt = splitmix64((seed & M64) ^ 0x5265717565737473)
    return set(sorted(request_ids, key=lambda r: (splitmix64((r & M64) ^ salt), r))[:k])


def stats_without_sample(summary: dict) -> dict:
    out = json.loads(json.dumps(summary))
    out.pop("selection")
    out["trace"].pop("path")
    for sec in ("classification", "prefill_decode"):
        for key in SAMPLE_KEYS:
            out[sec].pop(key, None)
    return out


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    # 120 requests of 4 domains over several shards; ids not starting at 0, so ids are not indices
    return generate_trace(tmp_path_factory.mktemp("rs") / "trace", num_requests=120, num_layers=3, num_experts=16,
                          top_k=2, prompt_tokens=(4, 12), decode_tokens=(3, 8), shard_rows=700, seed=11,
                          first_request_id=1000)


@pytest.fixture(scope="module")
def rows(trace):
    return trace.routing(["request_id", "phase", "layer", "experts"]).collect()


def test_enough_samples_is_the_whole_trace(trace):
    whole = analyze_trace(trace.path, sample_requests=120)
    more = analyze_trace(trace.path, sample_requests=1 << 20)
    assert stats_without_sample(whole.summary) == stats_without_sample(more.summary)
    for sec in ("classification", "prefill_decode"):
        s = whole.summary[sec]
        assert s["available"] and s["whole_trace"] is True and "sample_note" not in s
        assert s["requests_in_trace"] == 120
    assert whole.summary["prefill_decode"]["requests"] == 120
    for name, df in whole.tables.items():
        assert df.equals(more.tables[name]), name


def test_sampled_set_is_the_bottom_k_by_hash(trace):
    ids = trace.requests()["request_id"].to_list()
    for seed in (0, 5):
        sel = build_selection(trace, None, None, seed, 1 << 17, 37)
        assert set(sel.request_ids[sel.sampled].tolist()) == bottom_k(ids, 37, seed)
    a = analyze_trace(trace.path, sample_requests=37, seed=5)
    got = set(a.tables["prefill_decode_requests"]["request_id"].unique().to_list())
    assert got == bottom_k(ids, 37, 5)  # every request here has prefill and decode
    pd_ = a.summary["prefill_decode"]
    assert pd_["requests"] == 37 and pd_["requests_in_trace"] == 120 and pd_["whole_trace"] is False
    assert "37 of the trace's 120" in pd_["sample_note"]
    assert a.summary["selection"]["sample_requests"] == 37
    c = a.summary["classification"]
    assert c["train_requests"] + c["test_requests"] == 37 and c["whole_trace"] is False


def test_sums_are_exact_over_every_row(trace, rows):
    a = analyze_trace(trace.path, sample_requests=10)
    whole = analyze_trace(trace.path, sample_requests=1000)
    # expert loads from the raw rows, per phase
    raw = (rows.explode("experts").group_by(["layer", "experts", "phase"]).len()
           .pivot(on="phase", index=["layer", "experts"], values="len").fill_null(0)
           .rename({"experts": "expert"}).with_columns(pl.col("layer").cast(pl.Int16), pl.col("expert").cast(pl.Int16)))
    loads = a.tables["expert_loads"].join(raw, on=["layer", "expert"], how="left")
    assert (loads["prefill_count"] == loads["prefill"]).all() and (loads["decode_count"] == loads["decode"]).all()
    assert a.tables["expert_loads"].equals(whole.tables["expert_loads"])
    # per-domain counts (domain shift, specialists) and request counts are exact too
    for name in ("domain_shift", "domain_experts", "layer_imbalance"):
        assert a.tables[name].equals(whole.tables[name]), name
    for key in ("trace", "imbalance", "domain_shift"):
        assert a.summary[key] == whole.summary[key] or key == "trace"
    assert a.summary["trace"]["requests_per_domain"] == whole.summary["trace"]["requests_per_domain"]
    assert a.summary["trace"]["requests"] == 120 and a.summary["trace"]["token_routes"] == rows.height * 2


def _only(trace: Trace, keep: set[int], out) -> Trace:
    """A copy of ``trace`` holding only the requests ``keep`` (their rows and their requests.parquet rows)."""
    req = trace.requests().filter(pl.col("request_id").is_in(sorted(keep)))
    routing = trace.routing().filter(pl.col("request_id").is_in(sorted(keep))).collect().to_arrow()
    with TraceWriter(out, model=trace.model, source=trace.manifest.source) as w:
        for r in req.to_dicts():
            w.set_request(r["request_id"], r["domain"], dataset=r["dataset"], prompt_tokens=r["prompt_tokens"],
                          decode_tokens=r["decode_tokens"])
        w.write_routing(routing.cast(pa.schema([f for f in routing.schema])))
    return Trace.open(out)


def test_statistics_use_exactly_the_sampled_requests(trace, rows, tmp_path):
    ids = trace.requests()["request_id"].to_list()
    keep = bottom_k(ids, 40, 0)
    a = analyze_trace(trace.path, sample_requests=40)
    sub = analyze_trace(_only(trace, keep, tmp_path / "sub").path)
    for sec in ("classification", "prefill_decode"):
        x, y = dict(a.summary[sec]), dict(sub.summary[sec])
        for key in SAMPLE_KEYS:
            x.pop(key, None), y.pop(key, None)
        assert x == y, sec
    for name in ("classification", "prefill_decode", "prefill_decode_requests"):
        assert a.tables[name].equals(sub.tables[name]), name
    # per-request Pearson from the raw rows, in plain numpy
    E, layers = 16, sorted(rows["layer"].unique().to_list())
    sampled = rows.filter(pl.col("request_id").is_in(sorted(keep))).explode("experts")
    counts = {}
    grouped = sampled.group_by(["request_id", "phase", "layer", "experts"]).len()
    for rid, phase, layer, e, n in grouped.iter_rows():
        counts.setdefault((rid, layer), np.zeros((2, E)))[int(phase == "decode"), e] = n
    table = a.tables["prefill_decode_requests"]
    assert table.height == len(keep) * len(layers)
    for rid, layer, pearson in table.select("request_id", "layer", "pearson").iter_rows():
        x, y = counts[(rid, layer)]
        expected = np.corrcoef(x, y)[0, 1] if x.std() and y.std() else np.nan
        assert (np.isnan(pearson) and np.isnan(expected)) or pearson == pytest.approx(expected, abs=1e-6)


def test_domains_filter_samples_only_selected_requests(trace):
    a = analyze_trace(trace.path, domains=["code", "math"], sample_requests=20)
    ids = trace.requests().filter(pl.col("domain").is_in(["code", "math"]))["request_id"].to_list()
    got = set(a.tables["prefill_decode_requests"]["request_id"].unique().to_list())
    assert got == bottom_k(ids, 20, 0)
    assert a.summary["prefill_decode"]["requests_in_trace"] == 60


def _interleaved(trace: Trace, out) -> Trace:
    """``trace`` rewritten so that each shard holds a request from the start and one from the end of
    the id range: a row group's sampled requests are far apart in the sample (listed dense bins)."""
    ids = trace.requests()["request_id"].to_list()
    order = [r for pair in zip(ids[: len(ids) // 2], ids[::-1][: len(ids) // 2]) for r in pair]
    routing = trace.routing().collect()
    with TraceWriter(out, model=trace.model, source=trace.manifest.source) as w:
        for r in trace.requests().to_dicts():
            w.set_request(r["request_id"], r["domain"], prompt_tokens=r["prompt_tokens"],
                          decode_tokens=r["decode_tokens"])
        for a, b in zip(order[::2], order[1::2]):
            w.write_routing(routing.filter(pl.col("request_id").is_in([a, b])).to_arrow())
            w.flush()
    return Trace.open(out)


@pytest.mark.parametrize("sample_requests, layout", [(5, "short"), (300, "short"), (2000, "short"),
                                                     (1000, "interleaved"), (30, "interleaved")])
def test_row_groups_and_shards_merge_to_the_same_arrays(tmp_path, sample_requests, layout):
    """Dense range bins, dense listed bins and sparse (index, count) pairs: every path sums alike."""
    if layout == "short":
        # 2000 short requests (one token each way, 4 layers): a row group holds hundreds of sampled
        # requests with a few rows each, where dense bins would be mostly zeros -> the sparse path.
        t = generate_trace(tmp_path / "t", num_requests=2000, num_layers=4, num_experts=64, top_k=2,
                           prompt_tokens=(1, 2), decode_tokens=(1, 2), shard_rows=5000, seed=4)
    else:
        # 256 experts: a shard's two sampled requests, far apart in the sample, get two bins each
        t = _interleaved(generate_trace(tmp_path / "g", num_requests=120, num_layers=4, num_experts=256, top_k=2,
                                        prompt_tokens=(10, 20), decode_tokens=(5, 10), seed=4), tmp_path / "t")
        assert len(t.manifest.shards_of("routing")) == 60
    sel = build_selection(t, None, None, 0, 1 << 17, sample_requests)
    one = aggregate_routing(t, sel, threads=1)
    threads = aggregate_routing(t, sel, threads=2)
    shards = aggregate_shards(t, sel, LocalEngine(2))
    rows = t.routing(["request_id", "phase", "layer", "experts"]).collect()
    index = {r: i for i, r in enumerate(sel.request_ids.tolist())}
    slot = {int(i): s for s, i in enumerate(sel.sampled.tolist())}
    expected = np.zeros_like(one.sampled)
    for rid, phase, layer, experts in rows.iter_rows():
        s = slot.get(index[rid])
        if s is not None:
            for e in experts:
                expected[s, int(phase == "decode"), layer, e] += 1
    for agg in (one, threads, shards):
        np.testing.assert_array_equal(agg.sampled, expected)
        np.testing.assert_array_equal(agg.domains, one.domains)
        np.testing.assert_array_equal(agg.seen, one.seen)
    assert one.domains.sum() == rows.height * 2 and one.seen.all()


def test_shard_engine_equals_local_with_a_request_sample(tmp_path, monkeypatch):
    t = generate_trace(tmp_path / "t", num_requests=300, num_layers=3, num_experts=16, top_k=2,
                       prompt_tokens=(2, 6), decode_tokens=(2, 5), shard_rows=600, seed=9)
    local = analyze_trace(t.path, sample_requests=50)
    monkeypatch.setattr(analysis_run, "aggregate_routing",
                        lambda t, sel, units=None, threads=None, progress=None:
                        aggregate_shards(t, sel, LocalEngine(2), progress))
    sharded = analyze_trace(t.path, sample_requests=50)
    assert json.dumps(local.summary) == json.dumps(sharded.summary)
    assert local.summary["prefill_decode"]["whole_trace"] is False


def test_count_only_trace_with_a_request_sample(tmp_path):
    """Count tables (``loads/``) with request ids: per-domain sums exact, per-request counts sampled."""
    t = generate_trace(tmp_path / "t", num_requests=40, num_layers=2, num_experts=8, top_k=2, seed=2)
    frame = (t.routing(["request_id", "phase", "layer", "experts"]).explode("experts")
             .group_by(["request_id", "phase", "layer", "experts"]).len().collect())
    sel = build_selection(t, None, None, 0, 1 << 17, 7)
    loads = pa.table({
        "window": pa.array(np.zeros(frame.height, np.int64)),
        "phase": pa.array(frame["phase"].cast(pl.String).to_list()).dictionary_encode().cast(
            pa.dictionary(pa.int8(), pa.string())),
        "layer": pa.array(frame["layer"].to_numpy().astype(np.int16)),
        "expert": pa.array(frame["experts"].to_numpy().astype(np.int16)),
        "count": pa.array(frame["len"].to_numpy().astype(np.int64)),
        "request_id": pa.array(frame["request_id"].to_numpy().astype(np.int64)),
        "domain": pa.nulls(frame.height, pa.string()),
    })
    from moeprof.analysis.aggregate import aggregate_loads

    class CountsOnly:  # the trace's own loads() replaced by the table above
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def loads(self):
            return pl.from_arrow(loads).lazy()

    agg = aggregate_loads(CountsOnly(t), sel)
    routed = aggregate_routing(t, sel, threads=1)
    np.testing.assert_array_equal(agg.sampled, routed.sampled)
    np.testing.assert_array_equal(agg.domains, routed.domains)
    np.testing.assert_array_equal(agg.seen, routed.seen)


@pytest.mark.parametrize("value", [0, -3])
def test_bad_sample_requests_is_a_clear_error(trace, cli, value, tmp_path):
    with pytest.raises(UsageError, match="--sample-requests must be a whole number of at least 1"):
        analyze_trace(trace.path, sample_requests=value)
    res = cli("analyze", trace.path, "--sample-requests", str(value), "--out", tmp_path / "out")
    assert res.exit_code == 2 and "--sample-requests" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    res = cli("analyze", trace.path, "--sample-requests", "many")
    assert res.exit_code == 2 and "--sample-requests" in res.stderr


def test_cli_option_reaches_the_summary(trace, cli, tmp_path):
    res = cli("analyze", trace.path, "--sample-requests", "25", "--out", tmp_path / "a", "--json")
    assert res.exit_code == 0, res.stderr
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["selection"]["sample_requests"] == 25 and s["prefill_decode"]["requests"] == 25
    assert s["classification"]["requests"] == 25 and s["classification"]["whole_trace"] is False
    schema = json.loads(resources.files("moeprof.schemas").joinpath("summary.schema.json").read_text())
    jsonschema.validate(s, schema)
    assert pl.read_parquet(tmp_path / "a" / "tables" / "prefill_decode_requests.parquet")["request_id"].n_unique() == 25
