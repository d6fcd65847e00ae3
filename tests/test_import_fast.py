"""JSONL import: the column-wise fast path gives the same trace, and the same error naming the same
line, as reading every line one by one."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from moeprof.errors import MoeprofError
from moeprof.importers import ImportOptions, import_trace
from moeprof.importers import jsonl
from moeprof.trace.reader import Trace


def _line_by_line(self, data, n, path, line0):
    return False
    yield  # a generator, like the fast path


def _run(tmp_path, name, src, opts, fast, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(jsonl, "FAST_BLOCK_BYTES", 2048)  # many blocks: units and unit state cross them
        calls = {"fast": 0}
        real_fast = jsonl.JsonlImporter._fast

        def counted(self, *a):
            done = yield from real_fast(self, *a)
            calls["fast"] += bool(done)
            return done

        m.setattr(jsonl.JsonlImporter, "_fast", counted if fast else _line_by_line)
        rep = import_trace("jsonl", [src], tmp_path / name, opts)
    return rep, calls["fast"]


def _content(trace_dir):
    t = Trace.open(trace_dir, verify="full")
    routing = t.routing().collect().with_columns(pl.col("phase").cast(pl.String))
    man = t.manifest
    return (routing.to_dict(as_series=False), t.requests().sort("request_id").to_dict(as_series=False),
            dict(man.missing), list(man.notes), man.model.to_dict())


def _same(tmp_path, src, monkeypatch, **opts):
    o = ImportOptions(**opts)
    rep_fast, blocks = _run(tmp_path, "fast", src, o, True, monkeypatch)
    rep_slow, _ = _run(tmp_path, "slow", src, o, False, monkeypatch)
    assert blocks >= 3, "the fast path did not run"
    assert _content(tmp_path / "fast") == _content(tmp_path / "slow")
    assert rep_fast.routing_rows == rep_slow.routing_rows and rep_fast.warmup == rep_slow.warmup
    return rep_fast


def _write(path, lines, meta=True):
    with open(path, "w") as fh:
        if meta:
            fh.write(json.dumps({"meta": {"model": {"name": "toy", "num_experts": 16, "top_k": 2}}}) + "\n")
        for x in lines:
            fh.write((x if isinstance(x, str) else json.dumps(x)) + "\n")
    return path


def _hook_rows(n_req=12, tokens=9, layers=3, phase=True, key=lambda r: r, **extra):
    rng = np.random.default_rng(0)
    out = []
    for r in range(n_req):
        for t in range(tokens):
            for layer in range(layers):
                row = {"req_id": key(r), "token_idx": t, "layer": layer,
                       "topk_ids": rng.choice(16, 2, replace=False).tolist(), "topk_weights": [0.75, 0.25]}
                if phase:
                    row["phase"] = "prefill" if t < 5 else "decode"
                for name, f in extra.items():
                    row[name] = f(r, t, layer)
                out.append(row)
    return out


def test_hook_log_with_phase_and_weights(tmp_path, monkeypatch):
    src = _write(tmp_path / "a.jsonl", _hook_rows())
    rep = _same(tmp_path, src, monkeypatch, chunk_rows=10)  # units split inside blocks too
    assert rep.routing_rows == 12 * 9 * 3


def test_text_ids_interleaved_with_step_batch_and_token_ids(tmp_path, monkeypatch):
    rows = _hook_rows(phase=False, key=lambda r: f"req-{r % 3}", step=lambda r, t, l: max(0, t - 4),
                      batch_id=lambda r, t, l: r * 10 + t, token_id=lambda r, t, l: 1000 + t)
    rows = rows[::2] + rows[1::2]  # requests interleave line by line
    _same(tmp_path, _write(tmp_path / "b.jsonl", rows), monkeypatch)


def test_no_phase_no_step_after_warmup_rows_without_request(tmp_path, monkeypatch):
    warm = [{"req_id": None, "token_idx": 0, "layer": l, "topk_ids": [1, 2], "topk_weights": [0.5, 0.5]}
            for l in range(3)]
    src = _write(tmp_path / "c.jsonl", warm + _hook_rows(phase=False), meta=False)
    _same(tmp_path, src, monkeypatch, num_experts=16)


def test_decode_before_prefill_and_prompt_lengths_across_blocks(tmp_path, monkeypatch):
    rows = _hook_rows()
    # request 3's decode lines come first: their step counts from position 0, with a note
    rows = [r for r in rows if r["req_id"] == 3 and r["phase"] == "decode"] + \
           [r for r in rows if not (r["req_id"] == 3 and r["phase"] == "decode")]
    src = _write(tmp_path / "d.jsonl", rows)
    rep = _same(tmp_path, src, monkeypatch)
    assert any("no prefill rows" in n for n in Trace.open(tmp_path / "fast").manifest.notes), rep
    lens = tmp_path / "lens.csv"
    lens.write_text("request_id,prompt_tokens\n" + "".join(f"{r},{4 + r % 3}\n" for r in range(12)))
    (tmp_path / "p").mkdir()
    _same(tmp_path / "p", src, monkeypatch, phase_from=f"prompt-len:{lens}")


def test_phase_from_field_and_renamed_fields(tmp_path, monkeypatch):
    rows = [{("experts" if k == "topk_ids" else k): v for k, v in r.items()} for r in
            _hook_rows(phase=False, stage=lambda r, t, l: "EXTEND" if t < 3 else "DECODE")]
    src = _write(tmp_path / "e.jsonl", rows)
    _same(tmp_path, src, monkeypatch, phase_from="field:stage", fields={"topk_ids": "experts"})


BAD = [
    ("not json", lambda r: '{"req_id": 1, "token_idx": 0, "lay'),
    ("missing field", lambda r: {k: v for k, v in r.items() if k != "layer"}),
    ("top-k", lambda r: r | {"topk_ids": [1, 2, 3], "topk_weights": [0.5, 0.3, 0.2]}),
    ("expert id", lambda r: r | {"topk_ids": [1, 99]}),
    ("null phase", lambda r: r | {"phase": None}),
    ("unknown phase", lambda r: r | {"phase": "warmup"}),
    ("weights", lambda r: {k: v for k, v in r.items() if k != "topk_weights"}),
    ("weights length", lambda r: r | {"topk_weights": [1.0]}),
    ("float id", lambda r: r | {"topk_ids": [1.0, 2]}),
    ("text position", lambda r: r | {"token_idx": "x"}),
    ("a list", lambda r: "[1, 2]"),
    ("two objects", lambda r: json.dumps(r) + json.dumps(r)),
]


@pytest.mark.parametrize("what,spoil", BAD, ids=[b[0] for b in BAD])
def test_a_bad_line_deep_in_the_file_is_named(tmp_path, monkeypatch, what, spoil):
    rows = _hook_rows()
    at = 250  # well past the first blocks
    rows[at] = spoil(rows[at])
    src = _write(tmp_path / "bad.jsonl", rows)
    msgs = []
    for fast in (True, False):
        with pytest.raises(MoeprofError) as e:
            _run(tmp_path, f"t{fast}", src, ImportOptions(), fast, monkeypatch)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]
    assert f"line {at + 2}" in msgs[0]  # +1 for the meta line, +1 for counting from 1


def test_nan_weight_reads_as_the_line_reader_reads_it(tmp_path, monkeypatch):
    """pyarrow reads NaN, which JSON has not: the line reader decides (stdlib json reads it, orjson not)."""
    rows = [json.dumps(r) for r in _hook_rows()]
    rows[250] = rows[250].replace("0.25", "NaN")
    src = _write(tmp_path / "nan.jsonl", rows)
    outcome = []
    for fast in (True, False):
        try:
            _run(tmp_path, f"t{fast}", src, ImportOptions(), fast, monkeypatch)
            t = Trace.open(tmp_path / f"t{fast}").routing(["weights"]).collect()
            outcome.append(str(t["weights"].to_list()))
        except MoeprofError as e:
            outcome.append(str(e))
    assert outcome[0] == outcome[1]


def test_blank_line_and_two_objects_on_a_line(tmp_path, monkeypatch):
    rows = [json.dumps(r) for r in _hook_rows()]
    rows[100] += "\n"  # a blank line after line 102: the block's rows would again match its lines
    rows[120] = rows[120] + rows[121]
    src = _write(tmp_path / "two.jsonl", rows)
    with pytest.raises(MoeprofError, match="line 123: not valid JSON"):
        _run(tmp_path, "t", src, ImportOptions(), True, monkeypatch)


def test_blank_lines_keep_line_numbers(tmp_path, monkeypatch):
    rows = [json.dumps(r) for r in _hook_rows()]
    rows[100] += "\n"  # a blank line after line 102
    rows[300] = rows[300].replace('"layer"', '"lay"')
    src = _write(tmp_path / "blank.jsonl", rows)
    with pytest.raises(MoeprofError, match="line 303: field 'layer' is missing"):
        _run(tmp_path, "t", src, ImportOptions(), True, monkeypatch)


def test_each_block_parsed_once_the_next_while_this_one_is_checked(tmp_path, monkeypatch):
    import threading

    src = _write(tmp_path / "log.jsonl", _hook_rows())
    threads = []
    real_parse = jsonl.JsonlImporter._parse

    def parse(self, data):
        threads.append(threading.current_thread().name)
        return real_parse(self, data)

    monkeypatch.setattr(jsonl.JsonlImporter, "_parse", parse)
    _, blocks = _run(tmp_path, "fast", src, ImportOptions(), True, monkeypatch)
    assert blocks >= 3 and len(threads) == blocks  # no block parsed twice
    # the first block holds the head that types the columns: parsed where it is read; every later one ahead
    assert threads.count(threading.current_thread().name) == 1
    assert sum(name.startswith("moeprof-json") for name in threads) == blocks - 1
