"""The engine seam without Ray: clear errors, and the shard path (bottom-k merges) equal to the local pass."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from moeprof.analysis import run as analysis_run
from moeprof.analysis.aggregate import TokenSample
from moeprof.analysis.engine import LocalEngine, get_engine
from moeprof.analysis.shards import aggregate_shards, bottom_k
from moeprof.errors import UsageError
from moeprof.synthetic import generate_trace


def test_ray_missing_is_a_clear_error(monkeypatch, cli):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    with pytest.raises(UsageError, match=r"pip install 'moeprof\[ray\]'"):
        get_engine("ray")
    res = cli("analyze", "sample_data/trace", "--engine", "ray")
    assert res.exit_code == 2 and "moeprof[ray]" in res.stderr and "Traceback" not in res.stderr


def test_address_needs_ray_engine(cli):
    res = cli("analyze", "sample_data/trace", "--address", "auto")
    assert res.exit_code == 2 and "--engine ray" in res.stderr


def test_bottom_k_keeps_the_smallest_tokens_whole():
    rng = np.random.default_rng(0)
    token = rng.integers(0, 1 << 62, 50).astype(np.uint64)
    rows = np.repeat(np.arange(50), 3)  # three layers per token
    s = TokenSample(token[rows] ^ np.uint64(7), token[rows], np.tile(np.arange(3, dtype=np.int16), 50),
                    np.zeros((150, 2), np.int16))
    cut = bottom_k(s, 10)
    assert len(cut.hash) == 30 and set(cut.hash.tolist()) == set(np.sort(s.hash)[::3][:10].tolist())
    assert bottom_k(s, 0) is s and bottom_k(s, 50) is s


@pytest.mark.parametrize("sample_tokens", [1 << 17, 40])
def test_shard_tasks_on_threads_equal_the_local_pass(tmp_path, monkeypatch, sample_tokens):
    trace = generate_trace(tmp_path / "t", num_requests=48, shard_rows=1500, seed=2)
    assert len(trace.manifest.shards_of("routing")) > 10
    local = analysis_run.analyze_trace(trace.path, sample_tokens=sample_tokens)
    monkeypatch.setattr(analysis_run, "aggregate_routing",
                        lambda t, sel, units=None, threads=None, progress=None:
                        aggregate_shards(t, sel, LocalEngine(2), progress))
    sharded = analysis_run.analyze_trace(trace.path, sample_tokens=sample_tokens)
    assert json.dumps(local.summary) == json.dumps(sharded.summary)


def test_ray_client_connection_is_retried_then_reported(monkeypatch):
    """A ray:// client whose server fails to start on a busy head is tried again (3 times in all)."""
    ray = pytest.importorskip("ray")
    from moeprof.analysis import engine as eng_mod

    calls = []

    def init(**kw):
        calls.append(kw["address"])
        if len(calls) < 3:
            raise ConnectionError("Starting Ray client server failed")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(eng_mod.time, "sleep", lambda s: None)
    assert eng_mod.RayEngine("ray://127.0.0.1:1").workers == 2
    assert calls == ["ray://127.0.0.1:1"] * 3
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda **kw: (calls.append(kw), (_ for _ in ()).throw(ConnectionError("refused"))))
    with pytest.raises(eng_mod.EngineError, match=r"--address ray://127.0.0.1:1: cannot start or reach a Ray cluster \(refused\)"):
        eng_mod.RayEngine("ray://127.0.0.1:1")
    assert len(calls) == 3
