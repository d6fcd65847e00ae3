"""Shared fixtures: a CLI runner that returns (exit code, stdout, stderr), and small hand-built traces."""

from __future__ import annotations

import os
from dataclasses import dataclass

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread: correctness does not depend on it, and on a machine shared with other jobs
# spinning OpenMP threads make tiny models 20x slower (measured: 1.0 s vs 20-40 s per generate).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler while the test runs, as a command started from a terminal has it. A
    test run started as a shell's background job inherits SIGINT ignored: a SIGINT a test sends to its own
    process would do nothing, and a command it starts would ignore it too (exec keeps an ignored signal
    ignored, and resets a handled one to the default, which Python turns into KeyboardInterrupt)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``moeprof ARGS...`` in-process; return its exit code and captured output."""
    from moeprof.commands.main import main
    from moeprof.report import console as console_mod

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")

    def run(*args: str) -> CliResult:
        console_mod.reset_consoles()
        capsys.readouterr()
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run
