"""Phase codes and phases seen in the counting pass: fast paths against the plain mapping."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from moeprof.analysis.aggregate import _phase_codes
from moeprof.errors import AnalysisError
from moeprof.trace.schema import PHASES


def _plain(values: list[str]) -> np.ndarray:
    return np.array([PHASES.index(v) for v in values], np.int8)


@pytest.mark.parametrize("dictionary", [list(PHASES), list(reversed(PHASES)), ["decode"], ["prefill"]])
def test_phase_codes_of_any_dictionary_order(dictionary):
    rng = np.random.default_rng(len(dictionary))
    chunks = []
    for n in (5, 0, 17):  # several chunks, one empty
        idx = rng.integers(0, len(dictionary), n).astype(np.int32)
        chunks.append(pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), pa.array(dictionary)))
    col = pa.chunked_array(chunks)
    got = _phase_codes(col, "here")
    assert got.dtype == np.int8
    assert np.array_equal(got, _plain(col.to_pylist()))


def test_phase_codes_of_plain_strings_and_bad_values():
    col = pa.chunked_array([pa.array(["decode", "prefill", "decode"]), pa.array(["prefill"])])
    assert np.array_equal(_phase_codes(col, "here"), _plain(col.to_pylist()))
    bad = pa.chunked_array([pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int32()), pa.array(["prefill", "warmup"]))])
    with pytest.raises(AnalysisError, match="here: phase values"):
        _phase_codes(bad, "here")


def test_runs_of_request_ids():
    from moeprof.analysis.aggregate import _runs_of

    rid = np.repeat(np.array([5, 3, 5, 9]), [10, 20, 1, 9])
    heads, length = _runs_of(rid)
    assert heads.tolist() == [0, 10, 30, 31] and length.tolist() == [10, 20, 1, 9]
    assert _runs_of(np.arange(100)) is None  # runs of one row: looked up per row
    assert _runs_of(np.zeros(0, np.int64)) is None


@pytest.mark.parametrize("sample_requests,domains,slice_rows", [
    (4096, None, 1 << 18),  # 60 sampled requests of ~25 rows in one batch: sparse counts
    (5, None, 1 << 18),
    (4096, None, 300),  # a few requests a batch: dense bins
    (7, "two", 100),  # some domains left out: rows dropped, then looked up per row
])
def test_aggregates_are_the_same_per_run_and_per_row(tmp_path, monkeypatch, sample_requests, domains, slice_rows):
    """Rows in request order are looked up once a run of one request; rows interleaved, once a row:
    the aggregates (counts, request-sample counts, phases seen per request, token sample) are the same."""
    from moeprof.analysis import aggregate
    from moeprof.analysis.run import build_selection
    from moeprof.synthetic import generate_trace
    from moeprof.trace import Trace

    t = Trace.open(generate_trace(tmp_path / "t", num_requests=60, num_experts=256, prompt_tokens=(2, 6),
                                  decode_tokens=(1, 4), seed=5).path)
    doms = sorted(set(t.requests()["domain"].to_list()))
    sel = build_selection(t, None, doms[:2] if domains else None, 0, 1 << 17, sample_requests)
    monkeypatch.setattr(aggregate, "MIN_SLICE_ROWS", slice_rows)
    calls = []

    def spy(rid):
        calls.append(aggregate_runs(rid) is not None)
        return aggregate_runs(rid)

    aggregate_runs = aggregate._runs_of
    monkeypatch.setattr(aggregate, "_runs_of", spy)
    by_run = aggregate.aggregate_routing(t, sel, threads=1)
    assert any(calls)  # the synthetic trace is written in request order
    monkeypatch.setattr(aggregate, "_runs_of", lambda rid: None)
    by_row = aggregate.aggregate_routing(t, sel, threads=1)
    for name in ("domains", "sampled", "seen", "phases_seen"):
        assert np.array_equal(getattr(by_run, name), getattr(by_row, name)), name
    assert by_run.rows == by_row.rows and by_run.seen.any()
    for f in ("hash", "token", "layer", "experts"):
        assert np.array_equal(getattr(by_run.sample, f), getattr(by_row.sample, f)), f


@pytest.mark.parametrize("layers", [[3, 4, 5, 6], [3, 5, 6], [4, 5]])
def test_layer_index_by_offset_is_the_lookup(layers):
    """Selected layers l0, l0 + 1, ...: a row's index is layer - l0; otherwise (and for rows of other
    layers) the lookup table, -1 for a layer left out."""
    from moeprof.analysis.aggregate import Selection, _Pass

    sel = Selection(layers=layers, domains=["a"], request_ids=np.arange(3), request_domain=np.zeros(3, np.int32),
                    num_experts=8, top_k=2)
    work = _Pass(sel, None, False)
    lut = {layer: i for i, layer in enumerate(layers)}
    for rows in ([3, 4, 5, 6, 6, 3], [4, 5, 5], [2, 3, 7], [5]):
        layer = np.array(rows, np.int16)
        got = work._layer_index(layer)
        assert got.dtype == np.int32
        assert got.tolist() == [lut.get(x, -1) for x in rows]
