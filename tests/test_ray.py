"""``--engine ray`` on a real two-node Ray cluster on this machine (loopback only): every output equals
the local engine's, a task whose worker dies is retried, a corrupt shard stops the run with its name.

One cluster for the module (two nodes of one CPU each). Skipped when Ray is not installed
(``pip install 'moeprof[ray]'``; CI: ``.ci/ray.sh``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest

# Loopback only. Read when Ray is imported: without it, Ray rewrites 127.0.0.1 to the machine's
# outward address, where nothing of this cluster listens (so ray.init would wait forever).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from moeprof.analysis.engine import RayEngine  # noqa: E402
from moeprof.analysis.run import analyze, analyze_trace  # noqa: E402
from moeprof.errors import TraceIntegrityError  # noqa: E402
from moeprof.placement.run import compare  # noqa: E402
from moeprof.report.diff import diff  # noqa: E402
from moeprof.synthetic import generate_trace  # noqa: E402
from ray_cluster import faulty_cluster, free_port  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "trace"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    faults = tmp_path_factory.mktemp("faults")
    port = free_port()
    with faulty_cluster(faults, client_port=port) as c:
        c.client_port = port
        yield c, faults


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """A synthetic trace of many shards (request-ranged: each request's rows in one shard)."""
    return generate_trace(tmp_path_factory.mktemp("many") / "trace", num_requests=96, shard_rows=2500, seed=7)


def same_outputs(a: Path, b: Path) -> None:
    """summary.json byte for byte, and every table equal."""
    assert (a / "summary.json").read_bytes() == (b / "summary.json").read_bytes()
    tables = sorted(p.name for p in (a / "tables").iterdir())
    assert tables == sorted(p.name for p in (b / "tables").iterdir()) and tables
    for name in tables:
        assert pl.read_parquet(a / "tables" / name).equals(pl.read_parquet(b / "tables" / name)), name


def test_cluster_is_two_loopback_nodes(cluster):
    c, _ = cluster
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    eng = RayEngine()
    assert eng.workers == 2
    def node_of(item, shared):
        import time

        time.sleep(0.2)  # long enough that the second node's worker is up before the work runs out
        return ray.get_runtime_context().get_node_id()

    where = eng.map(node_of, list(range(12)))
    assert len(set(where)) == 2  # tasks ran on both nodes


def test_analyze_sample_trace_same_as_local(cluster, tmp_path, cli):
    assert cli("analyze", SAMPLE, "--out", tmp_path / "local").exit_code == 0
    res = cli("analyze", SAMPLE, "--out", tmp_path / "ray", "--engine", "ray")
    assert res.exit_code == 0, res.stderr
    same_outputs(tmp_path / "local", tmp_path / "ray")


@pytest.mark.parametrize("sample_tokens", [1 << 17, 900])  # whole trace, and a bottom-k sample
def test_analyze_many_shards_same_as_local(cluster, many, tmp_path, sample_tokens):
    assert len(many.manifest.shards_of("routing")) >= 15
    analyze(many.path, out=tmp_path / "local", sample_tokens=sample_tokens)
    analyze(many.path, out=tmp_path / "ray", sample_tokens=sample_tokens, engine="ray")
    same_outputs(tmp_path / "local", tmp_path / "ray")
    if sample_tokens == 900:
        summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
        assert summary["coactivation"]["whole_trace"] is False and 0 < summary["coactivation"]["tokens"] <= 900


@pytest.mark.parametrize("sample_requests", [20, 1000])  # a request sample, and every request
def test_request_sample_same_as_local(cluster, many, tmp_path, sample_requests):
    analyze(many.path, out=tmp_path / "local", sample_requests=sample_requests)
    analyze(many.path, out=tmp_path / "ray", sample_requests=sample_requests, engine="ray")
    same_outputs(tmp_path / "local", tmp_path / "ray")
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["prefill_decode"]["whole_trace"] is (sample_requests >= 96)
    assert summary["prefill_decode"]["requests"] == min(sample_requests, 96)


def test_short_requests_sparse_counts_same_as_local(cluster, tmp_path):
    """Many sampled requests of a few rows per row group: their counts travel as (index, count) pairs."""
    t = generate_trace(tmp_path / "short", num_requests=1500, num_layers=4, num_experts=256, top_k=2,
                       prompt_tokens=(1, 2), decode_tokens=(1, 2), shard_rows=2000, seed=4)
    analyze(t.path, out=tmp_path / "local", sample_requests=1000)
    analyze(t.path, out=tmp_path / "ray", sample_requests=1000, engine="ray")
    same_outputs(tmp_path / "local", tmp_path / "ray")


def test_trace_by_file_uri(cluster, many):
    local = analyze_trace(many.path, sample_tokens=900)
    remote = analyze_trace(f"file://{many.path.resolve()}", sample_tokens=900, engine="ray")
    assert remote.summary["trace"].pop("path").startswith("file:///")
    local.summary["trace"].pop("path")
    assert json.dumps(local.summary) == json.dumps(remote.summary)


def test_simulate_compare_same_as_local(cluster, tmp_path):
    def rows(cmp):
        out = []
        for row in cmp.to_dict()["rows"]:
            row = dict(row, fit_seconds=None, info=dict(row["info"], fit_seconds=None))
            out.append(row)
        return out

    opts = dict(nodes=2, gpus_per_node=2, seed=3)
    local = compare(SAMPLE, **opts)
    remote = compare(SAMPLE, engine=RayEngine(), **opts)
    assert rows(local) == rows(remote) and len(rows(local)) >= 5
    for key, p in local.placements.items():
        assert (p.phy2log == remote.placements[key].phy2log).all(), key


def test_diff_same_as_local(cluster, many, tmp_path):
    other = generate_trace(tmp_path / "other", num_requests=40, shard_rows=2500, seed=8)
    local = diff(many.path, other.path)
    remote = diff(many.path, other.path, engine="ray")
    assert local.to_json() == remote.to_json()


def test_worker_death_is_retried(cluster, many, tmp_path):
    _, faults = cluster
    armed = faults / "part-00004.parquet"
    armed.write_text("die once")
    analyze(many.path, out=tmp_path / "local")
    analyze(many.path, out=tmp_path / "ray", engine="ray")
    assert not armed.exists()  # the fault fired: a worker died mid-task and the task ran again
    same_outputs(tmp_path / "local", tmp_path / "ray")


def test_corrupt_shard_stops_the_run_with_its_name(cluster, many, tmp_path, cli):
    bad = tmp_path / "trace"
    shutil.copytree(many.path, bad)
    shard = bad / "routing" / "part-00005.parquet"
    with open(shard, "r+b") as fh:  # inside the pages: the footer, size and row count still agree
        fh.seek(1500)
        fh.write(b"\xff" * 64)
    with pytest.raises(TraceIntegrityError, match="part-00005.parquet"):
        analyze_trace(bad, engine="ray")
    res = cli("analyze", bad, "--engine", "ray", "--out", tmp_path / "out")
    assert res.exit_code == 2 and "part-00005.parquet" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_ray_client_address(cluster, tmp_path):
    """``--address ray://HOST:PORT`` from another process (a Ray client; needs grpcio, in moeprof[ray])."""
    pytest.importorskip("grpc")
    import subprocess
    import sys

    c, _ = cluster
    port = c.client_port
    # The head starts its client server in a process of its own: on a loaded machine it can come up
    # after the nodes do (the one flaky failure of this test). Wait for its port, as a user would.
    import socket
    import time

    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, f"the Ray client server never listened on port {port}"
            time.sleep(0.5)
    from moeprof.report.plots import write_plots

    analyze(SAMPLE, out=tmp_path / "local", writers=[write_plots])  # as the CLI does with --out
    res = subprocess.run(
        [sys.executable, "-m", "moeprof", "analyze", str(SAMPLE), "--out", str(tmp_path / "client"),
         "--engine", "ray", "--address", f"ray://127.0.0.1:{port}", "--json"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, MOEPROF_RAY_FAULTS=""),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    same_outputs(tmp_path / "local", tmp_path / "client")
