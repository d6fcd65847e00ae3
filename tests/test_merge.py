"""`moeprof merge`: traces of several ranks read as one, with no routing row copied."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from moeprof.analysis.run import analyze_trace
from moeprof.errors import TraceError, UsageError
from moeprof.synthetic import generate_trace
from moeprof.trace.merge import merge_traces
from moeprof.trace.reader import Trace
from moeprof.trace.writer import TraceWriter


def split_ranks(src: Trace, out: Path, ranks: int, *, shift_batches: bool) -> list[Path]:
    """Write request r's rows to rank r % ranks, as a data-parallel fleet would record them."""
    rows = src.routing().collect()
    req = src.requests()
    paths = []
    for rank in range(ranks):
        path = out / f"rank{rank}"
        with TraceWriter(path, model=src.model, source=src.manifest.source, shard_rows=3000) as w:
            mine = rows.filter(pl.col("request_id") % ranks == rank)
            if shift_batches:  # each rank numbers its forward passes in its own range
                mine = mine.with_columns(pl.col("batch_id") + rank * 1_000_000)
            w.write_routing(mine.to_arrow())
            for r in req.filter(pl.col("request_id") % ranks == rank).to_dicts():
                w.set_request(r["request_id"], r["domain"], dataset=r["dataset"], prompt_tokens=r["prompt_tokens"],
                              decode_tokens=r["decode_tokens"])
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return generate_trace(tmp_path_factory.mktemp("whole") / "trace", num_requests=60, shard_rows=4000, seed=5)


def test_merged_ranks_analyse_like_the_whole_trace(whole, tmp_path):
    ranks = split_ranks(whole, tmp_path, 3, shift_batches=True)
    manifest = merge_traces(ranks, tmp_path / "merged")
    merged = Trace.open(tmp_path / "merged", verify="full")  # sha256 of every listed shard checks out
    assert merged.num_routing_rows == whole.num_routing_rows
    assert not list((tmp_path / "merged").rglob("*/part-*.parquet"))  # no row copied
    assert all(s.path.startswith("../rank") for s in manifest.shards_of("routing"))
    assert "batch_id" not in manifest.missing  # disjoint pass ids stay usable
    a, b = analyze_trace(whole.path), analyze_trace(merged.path)
    for key in ("imbalance", "domain_shift", "prefill_decode", "classification"):
        assert a.summary[key] == b.summary[key], key
    assert a.tables["expert_loads"].equals(b.tables["expert_loads"])


def test_overlapping_pass_ids_are_marked_and_collisions_refused(whole, tmp_path):
    ranks = split_ranks(whole, tmp_path, 2, shift_batches=False)
    manifest = merge_traces(ranks, tmp_path / "merged")
    assert "overlap" in manifest.missing["batch_id"]
    with pytest.raises(TraceError, match=r"request id 0 is in .*rank0.* and .*rank0"):
        merge_traces([ranks[0], ranks[0]], tmp_path / "twice")
    with pytest.raises(UsageError, match="is or holds the source"):
        merge_traces(ranks, ranks[0], force=True)
    assert Trace.open(ranks[0]).num_routing_rows > 0  # the source is untouched


def test_merge_cli(whole, tmp_path, cli):
    ranks = split_ranks(whole, tmp_path, 2, shift_batches=True)
    res = cli("merge", *ranks, "--out", tmp_path / "m", "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["routing_rows"] == whole.num_routing_rows and info["traces"] == 2
    res = cli("merge", ranks[0], "--out", tmp_path / "m2")
    assert res.exit_code == 2 and "two or more" in res.stderr
    assert not (tmp_path / "m2").exists()  # nothing half-written
