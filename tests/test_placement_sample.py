"""``place`` and ``simulate`` read a bounded request sample (``--sample-requests``, ``--sample-rows``).

- Under both budgets the sample is every request, and the counts and token rows equal those taken
  from the raw rows with polars (the results of place/simulate are the same as before: the other
  placement tests and the README's tables did not change).
- Over them, on a synthetic trace of many shards: the driver holds at most ``--sample-rows`` token
  rows and ``--sample-requests`` requests (far fewer than the trace has, and the arrays it keeps
  within what the budgets allow); the sample is the bottom-k by a hash recomputed here in plain Python, cut
  to the longest prefix within the rows; eplb's input is summed over every train request, equal to
  a polars sum over the raw rows; ``place`` fits on the sample's train requests and ``simulate
  --placement`` scores the same held-out requests (the same metrics as ``place`` reported), reading
  only the shards that hold them; another budget is refused naming the option.
- The same rows rewritten without a request list, or in shards that interleave every request (as a
  capture of concurrent requests writes them): the same sample, counts, totals and token rows.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from moeprof.errors import PlacementError, UsageError
from moeprof.placement.data import load_routing, split_requests
from moeprof.placement.plan import read_placement, validate_placement_dict
from moeprof.placement.sample import check_budget, ids_digest, plan_sample
from moeprof.synthetic import generate_trace
from moeprof.trace import Trace
from moeprof.trace.schema import UNLABELLED

from test_request_sample import bottom_k, splitmix64  # noqa: F401  (the documented rule, in plain Python)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """240 requests in about 30 shards, each request's rows in one shard."""
    return generate_trace(tmp_path_factory.mktemp("sampled") / "trace", num_requests=240, num_layers=3,
                          num_experts=16, top_k=2, prompt_tokens=(8, 24), decode_tokens=(8, 40), shard_rows=1000,
                          seed=11)


def raw(trace: Trace) -> pl.DataFrame:
    return pl.read_parquet([str(p) for p in trace.shard_paths("routing")])


def test_under_the_budget_the_sample_is_the_whole_trace(many):
    data = load_routing(many)
    frame = raw(many)
    ids = np.sort(frame["request_id"].unique().to_numpy())
    assert data.sample.complete and np.array_equal(data.request_ids, ids)
    dec = frame.filter(pl.col("phase").cast(pl.String) == "decode")
    assert len(data.rows.token) == dec.height  # every decode row, in the trace's order
    assert np.array_equal(data.rows.request, np.searchsorted(ids, dec["request_id"].to_numpy()))
    assert np.array_equal(data.rows.experts, dec["experts"].to_numpy().astype(np.int64).reshape(-1, 2))
    L = many.model.moe_layers
    for phase, counts in (("prefill", data.prefill), ("decode", data.decode)):
        part = frame.filter(pl.col("phase").cast(pl.String) == phase).explode("experts")
        agg = part.group_by(["request_id", "layer", "experts"]).len()
        want = np.zeros_like(counts)
        want[np.searchsorted(ids, agg["request_id"].to_numpy()), np.searchsorted(L, agg["layer"].to_numpy()),
             agg["experts"].to_numpy()] = agg["len"].to_numpy()
        assert np.array_equal(counts, want), phase


def held_bytes(data) -> int:
    r = data.rows
    return sum(a.nbytes for a in (r.request, r.step, r.token, r.layer, r.experts, data.prefill, data.decode))


def sampled(many, **budget):
    sample = plan_sample(many, seed=2, held_out=lambda n: split_requests(n, 0.3, 2), **budget)
    return load_routing(many, "decode", sample=sample, totals=True)


def test_over_the_budget_the_driver_holds_the_sample_only(many):
    frame = raw(many)
    decode_rows = frame.filter(pl.col("phase").cast(pl.String) == "decode").height
    assert many.num_routing_rows > 20_000 and len(many.manifest.shards_of("routing")) >= 30
    whole = load_routing(many)
    data = sampled(many, max_requests=60, max_rows=1500)
    assert whole.num_requests == 240 and len(whole.rows.token) == decode_rows
    # the budget binds: far fewer rows and requests than the trace has
    assert 0 < len(data.rows.token) <= 1500 < decode_rows and data.num_requests <= 60
    assert data.prefill.shape[0] == data.decode.shape[0] == data.num_requests
    # what the driver keeps: within what the budget allows (rows: 4 int64 + k expert ids; requests:
    # 2 phases x L x E int32), a small part of the whole trace's
    held = held_bytes(data)
    assert held <= 1500 * (4 + 2) * 8 + 60 * 2 * 3 * 16 * 4 < held_bytes(whole) / 4
    # the documented rule: bottom-k by hash, then the longest prefix (in hash order) within the rows
    per = frame.filter(pl.col("phase").cast(pl.String) == "decode").group_by("request_id").len()
    rows_of = dict(zip(per["request_id"].to_list(), per["len"].to_list()))
    ids = sorted(frame["request_id"].unique().to_list())
    order = sorted(bottom_k(ids, 60, 2), key=lambda r: (splitmix64(r ^ splitmix64(2 ^ 0x5265717565737473)), r))
    keep, total = [], 0
    for r in order:
        if total + rows_of.get(r, 0) > 1500:
            break
        keep.append(r)
        total += rows_of.get(r, 0)
    assert data.request_ids.tolist() == sorted(keep) and len(data.rows.token) == total
    assert data.sample.limited_by == "--sample-rows"
    # held out: the split over every request of the trace, restricted to the sample
    split = split_requests(240, 0.3, 2)
    assert np.array_equal(data.held_out, split[np.searchsorted(ids, data.request_ids)])
    # eplb's input: the train split's decode routes over every row, not only the sample's
    train_ids = np.asarray(ids)[~split]
    dec = frame.filter((pl.col("phase").cast(pl.String) == "decode") & pl.col("request_id").is_in(train_ids.tolist()))
    agg = dec.explode("experts").group_by(["layer", "experts"]).len()
    want = np.zeros((3, 16), np.int64)
    want[np.searchsorted(many.model.moe_layers, agg["layer"].to_numpy()), agg["experts"].to_numpy()] = agg["len"]
    assert np.array_equal(data.train_total(~data.held_out), want)
    assert data.train_total(np.ones(data.num_requests, bool)) is None  # another train set: its own sum


def test_place_and_simulate_score_the_same_held_out_requests(many, tmp_path, cli):
    out = tmp_path / "placement.json"
    budget = ["--sample-requests", "80", "--sample-rows", "2000"]
    r = cli("place", many.path, "-n", "2", "-g", "2", "--policy", "locality", "--seed", "2", "--out", out, "--json",
            *budget)
    assert r.exit_code == 0, r.stderr
    placed = json.loads(r.stdout)
    assert any("request sample" in n for n in placed["notes"])
    validate_placement_dict(json.loads(out.read_text()), str(out))  # fit.sample as the schema says
    rec = read_placement(out).fit["sample"]
    assert rec["sampled_requests"] <= 80 and rec["rows"] <= 2000 < rec["rows_read"]
    assert rec["requests_in_trace"] == 240 and rec["max_rows"] == 2000 and rec["seed"] == 2
    assert rec["train_requests"] + rec["test_requests"] == rec["sampled_requests"]
    sim = cli("simulate", many.path, "--placement", out, "--json")
    assert sim.exit_code == 0, sim.stderr
    metrics = json.loads(sim.stdout)["metrics"]
    assert metrics == placed["metrics"]  # the same held-out (and train) requests, the same scores
    assert metrics["requests"] == rec["test_requests"]
    # simulate read only the shards that hold a sampled request (the manifest's request-id ranges)
    sample = plan_sample(many, seed=2, max_requests=80, max_rows=2000)
    sample.held_out_all = split_requests(240, 0.3, 2)
    data = load_routing(many, "decode", sample=sample)
    assert ids_digest(data.request_ids[data.held_out]) == rec["test_ids_sha256"]
    assert data.sample.stats["shards_read"] < data.sample.stats["shards_in_trace"]
    # train and held-out never meet
    assert not set(data.request_ids[data.held_out]) & set(data.request_ids[~data.held_out])
    for option, value in (("--sample-rows", "3000"), ("--sample-requests", "81")):
        bad = cli("simulate", many.path, "--placement", out, option, value)
        assert bad.exit_code == 2 and f"{option} {value}" in bad.stderr and "leave" in bad.stderr, bad.stderr


def test_compare_on_a_sample(many, tmp_path, cli):
    r = cli("simulate", many.path, "--compare", "-n", "2", "-g", "2", "--sample-requests", "50", "--out", tmp_path / "c",
            "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["split"]["sample"]["sampled_requests"] == 50 and d["split"]["sample"]["limited_by"] == "--sample-requests"
    assert d["split"]["train_requests"] + d["split"]["test_requests"] == 50
    assert len(d["rows"]) == 6


def test_bad_budgets(many, tmp_path, cli):
    for value in (0, -5, True, 2.5):
        with pytest.raises(UsageError, match="--sample-rows"):
            check_budget(10, value)
        with pytest.raises(UsageError, match="--sample-requests"):
            check_budget(value, 10)
    r = cli("place", many.path, "-n", "2", "-g", "2", "--policy", "eplb", "--sample-rows", "-1", "--out", tmp_path / "p")
    assert r.exit_code == 2 and "--sample-rows" in r.stderr and not (tmp_path / "p").exists()
    r = cli("place", many.path, "-n", "2", "-g", "2", "--policy", "eplb", "--sample-rows", "3", "--out", tmp_path / "p")
    assert r.exit_code == 2 and "--sample-rows 3" in r.stderr and "raise --sample-rows" in r.stderr
    r = cli("place", many.path, "-n", "2", "-g", "2", "--policy", "eplb", "--sample-requests", "1", "--out", tmp_path / "p")
    assert r.exit_code == 2 and "raise --sample-requests or --sample-rows" in r.stderr
    with pytest.raises(PlacementError, match="no .* request"):
        from moeprof.placement.sample import check_sides

        check_sides(plan_sample(many, seed=0, held_out=lambda n: np.zeros(n, bool), max_requests=5), 0.3)
    r = cli("simulate", many.path, "--timeline", "-n", "2", "-g", "2", "--sample-rows", "10")
    assert r.exit_code == 2 and "--timeline" in r.stderr


def test_a_corrupt_shard_is_named(tmp_path, cli):
    trace = generate_trace(tmp_path / "t", num_requests=40, shard_rows=2000, seed=1)
    shard = trace.shard_paths("routing")[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = cli("place", trace.path, "-n", "2", "-g", "2", "--policy", "eplb", "--out", tmp_path / "p.json")
    assert r.exit_code == 2 and shard.name in r.stderr and not (tmp_path / "p.json").exists(), r.stderr


def _rewritten(many, out, *, listed: bool, interleave: bool):
    """``many``'s rows rewritten: without requests.parquet (ids from the rows) and/or with shards that
    interleave requests (wide, overlapping request-id ranges, as a capture of concurrent requests)."""
    from moeprof.trace import TraceWriter

    frame = raw(many)
    if interleave:  # every shard holds rows of requests from the whole id range
        frame = frame.with_columns((pl.col("request_id") * 7919 % 97).alias("k")).sort("k", maintain_order=True).drop("k")
    with TraceWriter(out, model=many.model, source=many.manifest.source, shard_rows=3000) as w:
        if listed:
            for r in many.requests().to_dicts():
                w.set_request(r["request_id"], r["domain"], prompt_tokens=r["prompt_tokens"],
                              decode_tokens=r["decode_tokens"])
        w.write_routing(frame.to_arrow().cast(raw(many).to_arrow().schema))
    return Trace.open(out)


@pytest.mark.parametrize("listed, interleave", [(False, False), (True, True)])
def test_same_sample_whatever_the_layout(many, tmp_path, listed, interleave):
    other = _rewritten(many, tmp_path / "t", listed=listed, interleave=interleave)
    if interleave:
        ranges = [s.request_ids for s in other.manifest.shards_of("routing")]
        assert all(hi - lo > 150 for lo, hi in ranges)  # every shard spans most requests
    budget = dict(max_requests=60, max_rows=1500)
    a, b = sampled(many, **budget), sampled(other, **budget)
    assert np.array_equal(a.request_ids, b.request_ids) and np.array_equal(a.held_out, b.held_out)
    assert np.array_equal(a.prefill, b.prefill) and np.array_equal(a.decode, b.decode)
    assert np.array_equal(a.totals, b.totals)
    key = lambda d: np.lexsort((d.rows.layer, d.rows.token, d.rows.request))  # noqa: E731 (row order follows the file)
    for f in ("request", "step", "layer", "experts"):
        assert np.array_equal(getattr(a.rows, f)[key(a)], getattr(b.rows, f)[key(b)]), f
    if not listed:
        assert set(b.domains) == {UNLABELLED} and other.requests().height == 0
