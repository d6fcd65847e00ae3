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

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "trace"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import socket

    from ray.cluster_utils import Cluster

    faults = tmp_path_factory.mktemp("faults")
    saved = os.environ.get("MOEPROF_RAY_FAULTS")
    os.environ["MOEPROF_RAY_FAULTS"] = str(faults)  # inherited by the raylets and their workers
    node = dict(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=100 << 20)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    c = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False, ray_client_server_port=port))
    try:
        c.add_node(**node)
        ray.init(address=c.address, log_to_driver=False, configure_logging=False)
        yield faults
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("MOEPROF_RAY_FAULTS", None)
        else:
            os.environ["MOEPROF_RAY_FAULTS"] = saved


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
