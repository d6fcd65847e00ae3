"""Capture's prefill/decode signals, and what a killed or interrupted capture keeps.

- A decode step whose KV cache the capture cannot see (the transformers 5.24 rename of
  ``past_key_values`` to ``cache`` made every decode step look like a new request) is an error,
  never junk requests: the cache signal is cross-checked with the step's position_ids.
- A capture killed with SIGKILL keeps what it recorded until a few seconds before (shards are cut
  on time as well as on size); Ctrl-C says what was kept and where.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from capture_models import build, cache_kw
from moeprof.capture.session import capture
from moeprof.errors import CaptureError
from moeprof.trace.reader import Trace


@pytest.fixture(scope="module")
def qwen():
    return build("qwen3_moe")


def _prefill(model, ids):
    out = model(input_ids=ids, use_cache=True, position_ids=torch.arange(ids.shape[1]).expand(ids.shape))
    return out.past_key_values if hasattr(out, "past_key_values") else out.cache


def test_decode_step_without_a_visible_cache_is_an_error(qwen, tmp_path):
    model, _ = qwen
    ids = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CaptureError, match=r"no KV cache was among the forward's arguments.*start at 6"):
        with capture(model, tmp_path / "t") as rec, torch.no_grad():
            model(input_ids=ids, position_ids=torch.arange(6).expand(2, 6))
            # the next token, at position 6, with its cache dropped on the way (as a renamed keyword was)
            model(input_ids=ids[:, -1:], position_ids=torch.full((2, 1), 6), use_cache=False)
    trace = Trace.open(tmp_path / "t")
    assert not trace.complete
    assert trace.requests().height == 2  # the prefill's two requests, no junk requests
    assert rec.steps == 1


def test_own_loop_with_cache_records_decode_steps(qwen, tmp_path):
    model, expected = qwen
    ids = torch.randint(1, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    with capture(model, tmp_path / "t") as rec, torch.no_grad():
        cache = _prefill(model, ids)
        nxt = ids[:, -1:]
        for i in range(3):
            out = model(input_ids=nxt, position_ids=torch.tensor([[5 + i]]), **{cache_kw(model): cache}, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
    df = Trace.open(tmp_path / "t").routing().collect()
    assert rec.steps == 4
    assert Trace.open(tmp_path / "t").requests().height == 1
    layer0 = df.filter(pl.col("layer") == expected.moe_layers[0]).sort("pos")
    assert layer0["pos"].to_list() == list(range(8))
    assert layer0["phase"].cast(pl.String).to_list() == ["prefill"] * 5 + ["decode"] * 3


def test_decode_positions_that_do_not_continue_are_an_error(qwen, tmp_path):
    model, _ = qwen
    ids = torch.randint(1, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    with pytest.raises(CaptureError, match="previous step ended at 4"):
        with capture(model, tmp_path / "t"), torch.no_grad():
            cache = _prefill(model, ids)
            model(input_ids=ids[:, -1:], position_ids=torch.tensor([[9]]), **{cache_kw(model): cache})


def _workload(path: Path, n: int) -> Path:
    from moeprof.sample_data import path as sample

    lines = sample("prompts.jsonl").read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")
    return path


def _moeprof(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "moeprof", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw
    )


def _wait_for_shard(trace: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"capture ended early: {proc.communicate()}"
        try:
            shards = json.loads((trace / "manifest.json").read_text())["shards"]
        except (FileNotFoundError, json.JSONDecodeError):
            shards = []
        if any(s["kind"] == "routing" for s in shards):
            return
        time.sleep(0.2)
    raise AssertionError("no routing shard appeared")


def test_sigkill_keeps_the_steps_recorded_seconds_before(tmp_path):
    """The whole workload would take minutes; killed once the first time-cut shard lands, the trace is
    valid, incomplete, and holds whole requests up to that point with no gap in any of them."""
    out = tmp_path / "trace"
    proc = _moeprof("capture", "--out", str(out), "--prompts", str(_workload(tmp_path / "w.jsonl", 200)),
                    "--max-new-tokens", "64", "--batch-size", "4")
    try:
        _wait_for_shard(out, proc)
        started = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 30
    trace = Trace.open(out, verify="full")
    assert not trace.complete
    df = trace.routing().collect()
    assert df.height > 0
    layers = df["layer"].n_unique()
    req = trace.requests()
    counted = df.group_by("request_id").len()
    joined = counted.join(req, on="request_id", how="left")
    assert joined["domain"].null_count() == 0  # every row's request is in the requests table
    assert (joined["len"] <= layers * (joined["prompt_tokens"] + joined["decode_tokens"])).all()
    for (rid,), rows in df.filter(pl.col("layer") == df["layer"].min()).group_by("request_id"):
        assert sorted(rows["pos"].to_list()) == list(range(rows.height)), f"request {rid} has a gap"


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_says_what_was_kept_and_where(tmp_path, sig, code, word, python_ctrl_c):
    # python_ctrl_c: a suite started as a shell's background job (SIGINT ignored) would start the capture with
    # SIGINT ignored too, where no import resets it (the oldest admitted versions: the capture ran to the end)
    out = tmp_path / "trace"
    proc = _moeprof("capture", "--out", str(out), "--prompts", str(_workload(tmp_path / "w.jsonl", 200)),
                    "--max-new-tokens", "64", "--batch-size", "4")
    try:
        _wait_for_shard(out, proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert f"{word}: kept" in stderr and str(out) in stderr and "marked incomplete" in stderr
    trace = Trace.open(out, verify="full")
    assert not trace.complete
    kept = int(stderr.split("kept ")[1].split(" routing rows")[0].replace(",", ""))
    assert trace.routing().collect().height == kept


def test_progress_lines_in_a_log(tmp_path):
    """stderr not a terminal: plain progress lines (requests done, tokens/s, rows), not nothing."""
    out = tmp_path / "trace"
    proc = _moeprof("capture", "--out", str(out), "--prompts", str(_workload(tmp_path / "w.jsonl", 8)),
                    "--max-new-tokens", "4", "--batch-size", "4")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("capturing")]
    assert lines and lines[-1].startswith("capturing (") and ": 8/8 (100%)" in lines[-1]
    assert "tokens/s" in lines[-1] and "rows" in lines[-1]
