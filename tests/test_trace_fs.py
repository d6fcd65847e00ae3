"""Traces addressed by URI (pyarrow.fs): the same analysis as from the local path, errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeprof.analysis.run import analyze_trace
from moeprof.errors import TraceError, TraceIntegrityError
from moeprof.trace import fs
from moeprof.trace.reader import Trace

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "trace"


def test_join_keeps_query_and_resolves_parent_paths():
    assert fs.join("s3://b/runs/merged", "../rank0/routing/p.parquet") == "s3://b/runs/rank0/routing/p.parquet"
    assert fs.join("s3://b/t?region=eu-west-1", "manifest.json") == "s3://b/t/manifest.json?region=eu-west-1"
    assert fs.join("sample_data/trace", "manifest.json") == Path("sample_data/trace/manifest.json")
    assert fs.is_uri("gs://b/x") and fs.is_uri("hdfs://nn:8020/x") and not fs.is_uri("/tmp/x")


def _copy_to_memory(src: Path, root: str) -> None:
    """Upload a trace into pyarrow's in-memory filesystem (the process-wide one behind mock:///)."""
    mem, base = fs.resolve(root)
    for path in src.rglob("*"):
        if path.is_file():
            target = f"{base}/{path.relative_to(src).as_posix()}"
            mem.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with mem.open_output_stream(target) as out:
                out.write(path.read_bytes())


def strip_path(summary: dict) -> str:
    return json.dumps({**summary, "trace": {k: v for k, v in summary["trace"].items() if k != "path"}})


@pytest.mark.parametrize("scheme", ["file", "mock"])
def test_analyze_by_uri_equals_local_path(scheme, tmp_path):
    if scheme == "file":
        uri = f"file://{SAMPLE.resolve()}"
    else:
        uri = f"mock:///{tmp_path.name}/trace"
        _copy_to_memory(SAMPLE, uri)
    trace = Trace.open(uri, verify="full")
    assert trace.num_routing_rows == Trace.open(SAMPLE).num_routing_rows
    local, remote = analyze_trace(SAMPLE), analyze_trace(uri)
    assert remote.summary["trace"]["path"] == uri
    assert strip_path(local.summary) == strip_path(remote.summary)


def test_uri_errors_name_the_file(tmp_path):
    with pytest.raises(TraceError, match=r"mock:///nowhere/manifest.json: not found"):
        Trace.open("mock:///nowhere")
    uri = f"mock:///{tmp_path.name}/bad"
    _copy_to_memory(SAMPLE, uri)
    mem, base = fs.resolve(uri)
    with mem.open_output_stream(f"{base}/routing/part-00000.parquet") as out:
        out.write(b"not parquet")
    with pytest.raises(TraceIntegrityError, match=r"routing/part-00000.parquet: \d+ bytes"):
        Trace.open(uri)


def test_hdfs_without_libhdfs_says_what_is_missing(cli):
    """pyarrow's HadoopFileSystem needs libhdfs and a JVM; without them the error says what to install
    (in one line, not pyarrow's list of every directory it tried)."""
    res = cli("analyze", "hdfs://127.0.0.1:1/traces/day1")
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    if "libhdfs" not in res.stderr and "libjvm" not in res.stderr:
        pytest.skip("libhdfs and a JVM load on this machine: the error is about the namenode instead")
    assert "hdfs://127.0.0.1:1/traces/day1/manifest.json: hdfs:// needs Hadoop's libhdfs and a Java runtime" in res.stderr
    assert "JAVA_HOME" in res.stderr and "dlopen" not in res.stderr
