"""The engine-neutral part of live capture: pass layouts -> rows, the rank recorder, rank merging, tags."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest

from moeprof.capture.live import BATCH_STRIDE, REQUEST_STRIDE, LiveRecorder, PassRecord
from moeprof.capture.rows import PositionLedger, StepLayout, routing_columns, token_columns
from moeprof.capture.shards import merge_ranks
from moeprof.capture.tags import make_tag, parse_tag
from moeprof.trace.manifest import ModelInfo
from moeprof.trace.reader import Trace


def test_token_columns_known_answer():
    # Request 7: a prompt of 5 tokens, chunk 2 of its prefill (positions 3, 4); request 9: prompt 2,
    # decoding its third generated token (position 4 = decode step 3).
    layout = StepLayout.of([7, 9], [2, 1], [3, 4], [5, 2])
    cols = token_columns(layout)
    assert cols["request_id"].tolist() == [7, 7, 9]
    assert cols["pos"].tolist() == [3, 4, 4]
    assert cols["phase"].tolist() == [0, 0, 1]
    assert cols["step"].tolist() == [0, 0, 3]


def test_routing_columns_are_layer_major_and_keep_selects_tokens():
    layout = StepLayout.of([1, 2], [2, 1], [0, 6], [2, 3])
    experts = np.arange(2 * 3 * 2).reshape(2, 3, 2)  # (L=2, n=3, k=2)
    cols = routing_columns(layout, experts, np.array([3, 5]), batch_id=11, token_ids=np.array([40, 41, 42]),
                           keep=np.array([True, False, True]))
    assert cols["layer"].tolist() == [3, 3, 5, 5]
    assert cols["request_id"].tolist() == [1, 2, 1, 2]
    assert cols["pos"].tolist() == [0, 6, 0, 6]
    assert cols["experts"].tolist() == [[0, 1], [4, 5], [6, 7], [10, 11]]
    assert cols["token_id"].tolist() == [40, 42, 40, 42]
    assert cols["batch_id"].tolist() == [11] * 4
    assert cols["weights"] is None
    with pytest.raises(ValueError, match="3 tokens"):
        routing_columns(StepLayout.of([1], [1], [0], [1]), experts, np.array([3, 5]))


def test_ledger_records_a_recomputed_position_once():
    ledger = PositionLedger()
    assert ledger.fresh(StepLayout.of([1], [4], [0], [4])).tolist() == [True] * 4
    assert ledger.fresh(StepLayout.of([1], [1], [4], [4])).tolist() == [True]
    # Preempted and resumed: the engine recomputes positions 0..4, then decodes position 5.
    assert ledger.fresh(StepLayout.of([1], [6], [0], [4])).tolist() == [False] * 5 + [True]
    assert ledger.recomputed == 5


def test_tags_round_trip_any_text():
    tag = make_tag(12, "code~py/3 ü", "Human Eval")
    assert tag.count("~") == 4  # the separators only: "~" inside a field is escaped
    got = parse_tag(f"cmpl-{tag}-0-1a2b3c4d")
    assert (got.index, got.domain, got.dataset) == (12, "code~py/3 ü", "Human Eval")
    assert parse_tag("cmpl-abc-0") is None
    assert parse_tag(make_tag(0, "chat")).dataset is None


def _model() -> ModelInfo:
    return ModelInfo(name="m", num_experts=8, top_k=2, moe_layers=[1, 2], num_layers=3)


def _pass(engine_ids, num_tokens, start, prompt, layers=2, seed=0) -> PassRecord:
    n = int(sum(num_tokens))
    rng = np.random.default_rng(seed)
    experts = rng.integers(0, 8, size=(n, layers, 2))
    return PassRecord(list(engine_ids), np.array(num_tokens), np.array(start), np.array(prompt), experts, np.arange(n))


def test_live_recorder_writes_requests_domains_and_a_complete_trace(tmp_path):
    rec = LiveRecorder(tmp_path, "dp0-pp0", _model(), [1, 2], "vllm", flush_seconds=60)
    tag = make_tag(3, "math", "CHAMP")
    rec.push(_pass([f"cmpl-{tag}-0-aa", "plain-1"], [3, 2], [0, 0], [3, 2]))  # both prefill
    rec.push(_pass([f"cmpl-{tag}-0-aa", "plain-1"], [1, 1], [3, 2], [3, 2], seed=1))  # both decode step 1
    rec.close()
    trace = Trace.open(tmp_path, verify="full")
    assert trace.complete
    req = trace.requests().sort("request_id")
    assert req["domain"].to_list() == ["math", "unlabelled"]
    assert req["dataset"].to_list() == ["CHAMP", None]
    assert req["prompt_tokens"].to_list() == [3, 2]
    assert req["decode_tokens"].to_list() == [1, 1]
    assert req["engine_request_id"].to_list() == [f"cmpl-{tag}-0-aa", "plain-1"]
    rows = trace.routing().collect()
    assert rows.height == (3 + 2 + 1 + 1) * 2
    assert sorted(rows["batch_id"].unique().to_list()) == [0, 1]
    assert rows.filter(pl.col("phase") == "decode")["step"].unique().to_list() == [1]


def test_a_killed_rank_leaves_every_flushed_pass(tmp_path):
    rec = LiveRecorder(tmp_path, "dp0-pp0", _model(), [1, 2], "vllm", flush_seconds=0.05)
    rec.push(_pass(["a"], [4], [0], [4]))
    deadline = time.monotonic() + 10
    while Trace.open(tmp_path).num_routing_rows < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    # No close(): the process dies here. What is on disk is a valid, incomplete trace of the pass.
    trace = Trace.open(tmp_path, verify="full")
    assert not trace.complete and trace.num_routing_rows == 8
    rec.close()


def test_ranks_merge_into_one_trace(tmp_path):
    # Two data-parallel ranks, each with its own requests; rank 1's ids and batch ids are offset.
    r0 = LiveRecorder(tmp_path, "dp0-pp0", _model(), [1, 2], "vllm", rank_offset=0, flush_seconds=60)
    r1 = LiveRecorder(tmp_path, "dp1-pp0", _model(), [1, 2], "vllm", rank_offset=1, flush_seconds=60)
    r0.push(_pass(["x"], [2], [0], [2]))
    r1.push(_pass(["y"], [3], [0], [3]))
    r0.close()
    assert not Trace.open(tmp_path).complete  # rank 1 still running
    r1.close()
    trace = Trace.open(tmp_path, verify="full")
    assert trace.complete
    assert trace.requests()["request_id"].to_list() == [0, REQUEST_STRIDE]
    assert sorted(trace.routing().collect()["batch_id"].unique().to_list()) == [0, BATCH_STRIDE]
    assert trace.num_routing_rows == (2 + 3) * 2
    assert sorted(trace.manifest.capture["ranks"]) == ["dp0-pp0", "dp1-pp0"]
    assert trace.model.dense_layers == [0]


def test_pipeline_stages_merge_one_request_row(tmp_path):
    # Stage 0 owns layer 1, stage 1 layer 2: same request, same id, rows of both layers, one request row.
    s0 = LiveRecorder(tmp_path, "dp0-pp0", _model(), [1], "vllm", flush_seconds=60)
    s1 = LiveRecorder(tmp_path, "dp0-pp1", _model(), [2], "vllm", flush_seconds=60)
    s0.push(_pass(["r"], [2], [0], [2], layers=1))
    s1.push(_pass(["r"], [2], [0], [2], layers=1))
    s0.close()
    s1.close()
    trace = Trace.open(tmp_path, verify="full")
    assert trace.requests().height == 1
    assert trace.model.moe_layers == [1, 2]
    assert sorted(trace.routing().collect()["layer"].unique().to_list()) == [1, 2]


def test_merge_refuses_ranks_of_different_models(tmp_path):
    LiveRecorder(tmp_path, "dp0-pp0", _model(), [1, 2], "vllm", flush_seconds=60).close()
    other = ModelInfo(name="m", num_experts=16, top_k=2, moe_layers=[1, 2], num_layers=3)
    with pytest.raises(Exception, match="not one model"):
        LiveRecorder(tmp_path, "dp1-pp0", other, [1, 2], "vllm", flush_seconds=60)
    with pytest.raises(Exception, match="not one model"):
        merge_ranks(tmp_path)


def test_plugin_is_inert_without_the_variable_and_checks_the_directory(tmp_path, monkeypatch):
    from moeprof.capture import vllm_plugin
    from moeprof.errors import OutputExistsError

    monkeypatch.delenv("MOEPROF_TRACE", raising=False)
    vllm_plugin.register()  # no variable: nothing imported, nothing patched, nothing raised
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError) as exc:
        vllm_plugin._prepare(tmp_path)
    assert str(exc.value) == (
        f"MOEPROF_TRACE={tmp_path}: {tmp_path} already exists; set MOEPROF_TRACE_FORCE=1 to replace it"
    )
    monkeypatch.setenv("MOEPROF_TRACE_FORCE", "1")
    with pytest.raises(OutputExistsError, match="refusing to delete .* even with MOEPROF_TRACE_FORCE=1"):
        vllm_plugin._prepare(tmp_path)
    # An earlier moeprof trace is replaced with the force variable.
    LiveRecorder(tmp_path / "old", "dp0-pp0", _model(), [1, 2], "vllm", flush_seconds=60).close()
    vllm_plugin._prepare(tmp_path / "old")
    assert [p.name for p in (tmp_path / "old").iterdir()] == [".moeprof"]  # emptied, and marked as a trace again
