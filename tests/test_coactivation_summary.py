"""The co-activation summary and tables do not depend on whether its steps ran on the pool: the top
pairs by lift computed on a thread of its own give the summary, tables and key order of a serial run."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from moeprof.analysis import coactivation as co
from moeprof.analysis import load, run
from moeprof.analysis.aggregate import DEFAULT_SAMPLE_TOKENS, aggregate_routing
from moeprof.trace.reader import Trace

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "trace"


@pytest.mark.parametrize("layers", [None, [2]])  # every layer; one layer: no transitions
def test_coactivation_on_the_pool_equals_serial(layers):
    full = run.analyze_trace(SAMPLE, layers=layers)
    results = []
    for pool in (None, ThreadPoolExecutor(max_workers=2)):
        a = run.Analysis(summary={})
        co_summary = full.summary["coactivation"]
        assert co_summary["available"]
        # the token matrix the analysis used, rebuilt as analyze_trace builds it
        trace = Trace.open(SAMPLE, verify="rows")
        sel = run.build_selection(trace, layers, None, 0, DEFAULT_SAMPLE_TOKENS)
        agg = aggregate_routing(trace, sel)
        tokens, dup = load.token_matrix(agg, DEFAULT_SAMPLE_TOKENS)
        caps = run._capabilities(trace, agg)
        out = run._coactivation(a, tokens, dup, agg, caps, trace, sel.layers, co.DEFAULT_TOKENS, "top", pool)
        if pool is not None:
            pool.shutdown()
        results.append((out, a.tables))
    (serial, t_serial), (pooled, t_pooled) = results
    assert json.dumps(serial) == json.dumps(pooled)  # same values, same key order
    assert json.dumps(pooled, default=float) == json.dumps(full.summary["coactivation"], default=float)
    assert list(t_serial) == list(t_pooled)
    for name in t_serial:
        assert t_serial[name].equals(t_pooled[name])
    if layers == [2]:
        assert list(pooled)[-2:] == ["pairs", "transitions"]
        assert not pooled["transitions"]["available"] and pooled["pairs"]["available"]
