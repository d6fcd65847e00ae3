"""TensorRT-LLM's expert statistics dump (meta_info.json + rank{r}.safetensors) as count tables."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

import import_fixtures as fx
from moeprof.importers import ImportOptions, detect, import_trace
from moeprof.trace.reader import Trace

pytest.importorskip("safetensors")


def test_two_ranks_sum_per_iteration_and_layer(tmp_path):
    r0 = fx.trtllm_statistic(tmp_path / "stat", 0)
    r1 = fx.trtllm_statistic(tmp_path / "stat", 1)
    assert detect(r0) == detect(r1) == "trtllm"
    rep = import_trace("auto", [r0, r1], tmp_path / "t")
    trace = Trace.open(tmp_path / "t", verify="full")
    assert trace.manifest.source == "trtllm"
    assert (trace.model.num_experts, trace.model.top_k, trace.model.moe_layers) == (4, 2, [1, 3])
    got = (trace.loads().group_by("window", "layer", "expert").agg(pl.col("count").sum())
           .sort("window", "layer", "expert").collect())
    # rank 0 + rank 1 (= 2 x rank 0) = 3 x rank 0's counts, window = TensorRT-LLM's iteration.
    expected = {(100, 1): [3, 0, 1, 2], (100, 3): [1, 1, 2, 2], (101, 1): [0, 4, 0, 2], (101, 3): [2, 2, 1, 1]}
    for (it, layer), counts in expected.items():
        sel = got.filter((pl.col("window") == it) & (pl.col("layer") == layer))
        assert sel["count"].to_list() == [3 * c for c in counts]
    assert rep.loads_rows == 2 * 4 * 4
    assert "per_token" in trace.manifest.missing and "phase" in trace.manifest.missing
    assert any("load balancer" in n for n in trace.manifest.notes)


def test_analyze_runs_on_the_imported_counts(tmp_path, cli):
    fx.trtllm_statistic(tmp_path / "stat", 0)
    assert cli("import", "trtllm", tmp_path / "stat" / "rank0.safetensors", "--out", tmp_path / "t").exit_code == 0
    res = cli("analyze", tmp_path / "t", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.stderr


def test_missing_meta_info_names_the_file_and_the_way_out(tmp_path, cli):
    src = fx.trtllm_statistic(tmp_path / "stat", 1)  # rank 1 alone: only rank 0 writes meta_info.json
    res = cli("import", "trtllm", src, "--out", tmp_path / "t")
    assert res.exit_code == 2
    assert "meta_info.json not found" in res.stderr and "--num-experts and --top-k" in res.stderr
    res = cli("import", "trtllm", src, "--out", tmp_path / "t2", "--num-experts", "4", "--top-k", "2")
    assert res.exit_code == 0, res.stderr


def test_counts_of_the_wrong_width_or_raw_dumps_are_refused(tmp_path, cli):
    from safetensors.numpy import save_file

    d = tmp_path / "stat"
    fx.trtllm_statistic(d, 0)
    (d / "meta_info.json").write_text(json.dumps({"num_experts": 8, "num_experts_per_token": 2}))
    res = cli("import", "trtllm", d / "rank0.safetensors", "--out", tmp_path / "t")
    assert res.exit_code == 2 and "4 counts, but" in res.stderr and "says 8 experts" in res.stderr
    save_file({"100_1": np.zeros((5, 2), np.int32)}, str(d / "rank0_raw.safetensors"))
    res = cli("import", "trtllm", d / "rank0_raw.safetensors", "--out", tmp_path / "t3")
    assert res.exit_code == 2 and "raw per-token" in res.stderr
