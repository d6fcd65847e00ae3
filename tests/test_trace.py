"""Trace format v1: round trip, integrity checks, versions, interrupted writes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from moeprof.errors import OutputExistsError, TraceIntegrityError, TraceVersionError
from moeprof.trace import ModelInfo, Trace, TraceWriter, routing_schema

MODEL = ModelInfo(name="hand", num_experts=4, top_k=2, moe_layers=[1, 2], num_layers=3, dense_layers=[0])


def _write(out, shard_rows=4, complete=True):
    w = TraceWriter(out, model=MODEL, source="hf", shard_rows=shard_rows)
    w.set_request(7, "code", prompt_tokens=3, decode_tokens=1)
    for layer in (1, 2):
        w.write_routing(
            dict(request_id=7, step=0, phase="prefill", pos=np.arange(3), layer=layer,
                 experts=[[0, 1], [2, 3], [1, 0]], weights=[[0.6, 0.4]] * 3, batch_id=0, token_id=[5, 6, 7])
        )
        w.write_routing(
            dict(request_id=7, step=1, phase="decode", pos=3, layer=layer, experts=[[3, 2]], weights=None, batch_id=1)
        )
    w.close(complete=complete)
    return out


def test_round_trip_keeps_every_row_and_type(tmp_path):
    t = Trace.open(_write(tmp_path / "t"), verify="full")
    rows = t.routing().collect()
    assert rows.height == 8 == t.num_routing_rows
    assert t.complete
    assert sorted(rows["phase"].cast(str).unique().to_list()) == ["decode", "prefill"]
    prefill_l1 = rows.filter((rows["layer"] == 1) & (rows["step"] == 0)).sort("pos")
    assert prefill_l1["experts"].to_list() == [[0, 1], [2, 3], [1, 0]]
    assert prefill_l1["token_id"].to_list() == [5, 6, 7]
    assert rows.filter(rows["step"] == 1)["weights"].null_count() == 2
    schema = pq.read_schema(t.shard_paths("routing")[0])
    assert schema.field("experts").type == routing_schema(2).field("experts").type
    req = t.requests().to_dicts()
    assert req == [dict(request_id=7, domain="code", dataset=None, prompt_tokens=3, decode_tokens=1, text_sha256=None)]
    # 8 rows in shards of at most 4
    assert [s.rows for s in t.manifest.shards_of("routing")] == [4, 4]


def test_existing_output_needs_force_and_non_trace_is_never_deleted(tmp_path):
    out = _write(tmp_path / "t")
    with pytest.raises(OutputExistsError, match="pass --force"):
        TraceWriter(out, model=MODEL, source="hf")
    TraceWriter(out, model=MODEL, source="hf", force=True).close()
    assert Trace.open(out).num_routing_rows == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="refusing to delete"):
        TraceWriter(other, model=MODEL, source="hf", force=True)
    assert (other / "notes.txt").read_text() == "precious"


def test_truncated_and_altered_shards_are_named(tmp_path):
    out = _write(tmp_path / "t")
    shard = out / "routing" / "part-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceIntegrityError, match="part-00001.parquet.*truncated"):
        Trace.open(out)
    mid = 30  # inside the first data page: the footer still parses
    shard.write_bytes(data[:mid] + bytes([data[mid] ^ 1]) + data[mid + 1 :])
    Trace.open(out, verify="rows")  # same size and footer: only the checksum can tell
    with pytest.raises(TraceIntegrityError, match="part-00001.parquet.*sha256"):
        Trace.open(out, verify="full")


def test_newer_major_version_is_refused_with_both_versions(tmp_path):
    out = _write(tmp_path / "t")
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = "2.0"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceVersionError, match=r"2\.0 is newer.*format 1\.0.*upgrade"):
        Trace.open(out)


def test_exception_mid_write_leaves_valid_incomplete_trace(tmp_path):
    out = tmp_path / "t"
    with pytest.raises(RuntimeError):
        with TraceWriter(out, model=MODEL, source="hf", shard_rows=2) as w:
            w.set_request(0, "math", prompt_tokens=2)
            w.write_routing(dict(request_id=0, step=0, phase="prefill", pos=[0, 1], layer=1, experts=[[0, 1], [1, 2]]))
            w.flush()
            raise RuntimeError("boom")
    t = Trace.open(out, verify="full")
    assert not t.complete
    assert t.num_routing_rows == 2


def test_inspect_cli_reports_summary_and_names_bad_shard(tmp_path, cli):
    out = _write(tmp_path / "t")
    r = cli("inspect", out)
    assert r.exit_code == 0, r.stderr
    assert "top-2" in r.stdout and "code: 1" in r.stdout and "prefill 3" in r.stdout
    r = cli("inspect", out, "--json")
    info = json.loads(r.stdout)
    assert info["tokens_per_phase"] == {"prefill": 3, "decode": 1}
    (out / "routing" / "part-00000.parquet").write_bytes(b"garbage")
    r = cli("inspect", out)
    assert r.exit_code == 2
    assert "part-00000.parquet" in r.stderr and "Traceback" not in r.stderr
    r = cli("inspect", tmp_path / "nope")
    assert r.exit_code == 2 and "no such trace directory" in r.stderr
