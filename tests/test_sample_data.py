"""The shipped sample trace: valid, faithful to the workload, and showing the paper's findings.

It was captured from the shipped tiny model on the shipped workload (``moeprof capture --out
sample_data/trace``), so users without torch can run every other command on real routing.
"""

from __future__ import annotations

import json

import pytest

from moeprof.analysis.run import analyze_trace
from moeprof.sample_data import path
from moeprof.trace import Trace

TRACE = path("trace")


@pytest.fixture(scope="module")
def summary():
    return analyze_trace(TRACE).summary


def test_sample_trace_is_whole_and_matches_the_workload():
    t = Trace.open(TRACE, verify="full")
    assert t.complete and t.manifest.source == "hf"
    assert t.model.name == "tiny-moe" and (t.model.num_experts, t.model.top_k) == (32, 4)
    requests = t.requests()
    assert requests.height == 400
    assert sorted(requests["domain"].value_counts().sort("domain")["count"].to_list()) == [100] * 4
    ids = [json.loads(line)["id"] for line in path("prompts.jsonl").read_text().splitlines()]
    assert t.manifest.capture["workload_ids"] == ids
    # one row per prompt token and fed-back token, per MoE layer
    tokens = int((requests["prompt_tokens"] + requests["decode_tokens"]).sum())
    assert t.num_routing_rows == 4 * tokens


def test_sample_trace_shows_domain_shift_and_prefill_predicting_decode(summary):
    # The trained router, not chance: the domain is read off prefill routing (chance 25%), and a
    # request's own prefill predicts its decode better than another request's of the same domain.
    assert summary["classification"]["accuracy"] > 0.9
    pd = summary["prefill_decode"]
    assert pd["aggregate_pearson"] > 0.7
    assert pd["pearson"] > pd["controls"]["same_domain"]["pearson"] > pd["controls"]["other_domain"]["pearson"]
    assert summary["domain_shift"]["js_mean"] > 0.1
