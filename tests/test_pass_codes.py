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
