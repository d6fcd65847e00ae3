"""``simulate --engine ray`` on a real two-node Ray cluster on this machine (loopback only): the K-means
rounds of the fits and the scoring of held-out blocks run as Ray tasks, and every output equals the
local engine's; a task whose worker dies is retried.

Blocks are made small here (``BLOCK_BYTES``, ``SCORE_BLOCK_ROWS``, the same in the local and the Ray
run) so that each round is several tasks spread over both nodes. Skipped when Ray is not installed
(``pip install 'moeprof[ray]'``; CI: ``.ci/ray.sh``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# Loopback only (see tests/test_ray.py): without it Ray rewrites 127.0.0.1 to the outward address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from moeprof.analysis.engine import LocalEngine, RayEngine  # noqa: E402
from moeprof.placement import kmeans as km  # noqa: E402
from moeprof.placement import simulate as sm  # noqa: E402
from moeprof.synthetic import generate_trace  # noqa: E402
from ray_cluster import faulty_cluster  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "trace"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    faults = tmp_path_factory.mktemp("faults")
    with faulty_cluster(faults):
        yield faults


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(km, "BLOCK_BYTES", 8 * 128 * 40)  # 40 requests of a 4 × 32 signature
    monkeypatch.setattr(sm, "SCORE_BLOCK_ROWS", 5000)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """A synthetic trace of many shards (each request's rows in one shard)."""
    return generate_trace(tmp_path_factory.mktemp("many") / "trace", num_requests=160, shard_rows=2500, seed=7)


def same_dirs(a: Path, b: Path) -> None:
    """Every JSON file of ``a`` equals ``b``'s, but for the measured fit seconds and the write time."""
    def load(p: Path):
        def strip(o):
            if isinstance(o, dict):
                return {k: strip(v) for k, v in o.items() if k not in ("fit_seconds", "created_at")}
            return [strip(v) for v in o] if isinstance(o, list) else o

        return strip(json.loads(p.read_text()))

    names = sorted(p.name for p in a.glob("*.json"))
    assert names == sorted(p.name for p in b.glob("*.json")) and len(names) >= 6
    for name in names:
        assert load(a / name) == load(b / name), name


def test_kmeans_rounds_on_ray_same_bits(cluster, small_blocks):
    rng = np.random.default_rng(0)
    x = rng.random((400, 128)).astype(np.float32) ** 3
    local = km.fit_kmeans(x, 4, 1, engine=LocalEngine(2))
    remote = km.fit_kmeans(x, 4, 1, engine=RayEngine())
    assert local.blocks == remote.blocks == 10
    assert np.array_equal(local.labels, remote.labels)
    assert local.centroids.tobytes() == remote.centroids.tobytes() and local.inertia == remote.inertia


@pytest.mark.parametrize("which", ["sample", "many"])
def test_simulate_compare_same_as_local(cluster, small_blocks, many, tmp_path, cli, which):
    trace = SAMPLE if which == "sample" else many.path
    if which == "many":
        assert len(many.manifest.shards_of("routing")) >= 15
    args = ["simulate", trace, "--compare", "-n", "2", "-g", "2", "--redundant", "8", "--seed", "3", "--json"]
    local = cli(*args, "--out", tmp_path / "local")
    assert local.exit_code == 0, local.stderr
    remote = cli(*args, "--out", tmp_path / "ray", "--engine", "ray")
    assert remote.exit_code == 0, remote.stderr
    same_dirs(tmp_path / "local", tmp_path / "ray")
    rows = json.loads(remote.stdout)["rows"]
    assert [r["key"] for r in rows] == ["linear", "round_robin", "eplb", "kmeans", "locality", "locality+domain"]


def test_simulate_placement_same_as_local(cluster, small_blocks, many, tmp_path, cli):
    placement = tmp_path / "placement.json"
    assert cli("place", many.path, "-n", "2", "-g", "2", "--policy", "locality", "--out", placement).exit_code == 0
    local = cli("simulate", many.path, "--placement", placement, "--json")
    remote = cli("simulate", many.path, "--placement", placement, "--json", "--engine", "ray")
    assert local.exit_code == 0 and remote.exit_code == 0, remote.stderr
    assert local.stdout == remote.stdout and json.loads(remote.stdout)["metrics"]["tokens"] > 0


def test_dead_kmeans_and_scoring_tasks_are_retried(cluster, small_blocks, tmp_path, cli):
    faults = cluster
    armed = [faults / "kmeans-block-00002", faults / "score-block-00001"]
    args = ["simulate", SAMPLE, "--compare", "-n", "2", "-g", "4", "--json"]
    assert cli(*args, "--out", tmp_path / "local").exit_code == 0
    for f in armed:
        f.write_text("die once")
    remote = cli(*args, "--out", tmp_path / "ray", "--engine", "ray")
    assert remote.exit_code == 0, remote.stderr
    assert not any(f.exists() for f in armed)  # each fault fired: a worker died mid-task, the task ran again
    same_dirs(tmp_path / "local", tmp_path / "ray")


def test_request_sample_same_as_local(cluster, small_blocks, many, tmp_path, cli):
    """Over the budget (``--sample-requests``, ``--sample-rows``): ``place`` and ``simulate`` read the
    sample's counts and rows and the splits' per-expert loads in shard tasks; Ray's are the local
    engine's, bit for bit, and ``simulate --placement`` scores the held-out requests ``place`` scored."""
    budget = ["--sample-requests", "70", "--sample-rows", "3000"]
    armed = cluster / "part-00003.parquet"  # the task reading this shard dies once: Ray runs it again
    armed.write_text("die once")
    for engine in ("local", "ray"):
        r = cli("place", many.path, "-n", "2", "-g", "2", "--policy", "eplb", "--out", tmp_path / f"{engine}.json",
                "--engine", engine, "--json", *budget)
        assert r.exit_code == 0, r.stderr
    local, remote = (json.loads((tmp_path / f"{e}.json").read_text()) for e in ("local", "ray"))
    for d in (local, remote):
        d.pop("created_at")
        d["policy"]["info"].pop("fit_seconds")
    assert local == remote and not armed.exists()
    sample = local["fit"]["sample"]
    assert sample["rows"] <= 3000 < sample["rows_read"] and sample["sampled_requests"] <= 70 < 160
    for engine in ("local", "ray"):
        sim = cli("simulate", many.path, "--placement", tmp_path / "local.json", "--json", "--engine", engine)
        assert sim.exit_code == 0, sim.stderr
        assert json.loads(sim.stdout)["metrics"] == local["metrics"]
    args = ["simulate", many.path, "--compare", "-n", "2", "-g", "2", "--json", *budget]
    assert cli(*args, "--out", tmp_path / "cmp-local").exit_code == 0
    r = cli(*args, "--out", tmp_path / "cmp-ray", "--engine", "ray")
    assert r.exit_code == 0, r.stderr
    same_dirs(tmp_path / "cmp-local", tmp_path / "cmp-ray")
