"""Ctrl-C, many times over: how often `moeprof analyze` fails to stop cleanly when interrupted.

    python bench/ctrl_c_probe.py                              # 100 runs on the shipped sample trace
    python bench/ctrl_c_probe.py --runs 300 --trace bench/out/trace-1000000

Each run starts ``python -m moeprof analyze TRACE --out DIR`` in a session of its own, waits for its
figure zygote (the first child process), waits a jittered delay more (``--delay`` x 0.7 .. 1.3, so that
the interrupt lands at many points of the work), sends SIGINT to the whole process group as a terminal's
Ctrl-C does, and checks what the user sees: exit 130; stderr ending in one ``Aborted.`` with no line that
starts a Python traceback (``Traceback``, ``KeyboardInterrupt``, ``Exception ignored``); nothing left at
``--out``; no process of the session still running 10 s later (zombies waiting for init are not counted).
Prints each failing run whole and a summary of outcomes. A failure here is rare (about one run in 100 on
the tree before these checks existed), so a clean result needs hundreds of runs.

Not a test: it runs for minutes and its outcomes depend on timing. tests/test_user_probes.py and
tests/test_user_faults.py hold the deterministic tests of each failure this found.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _session(sid: int) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of the processes of session ``sid`` that have not exited."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                args = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
            if int(session) == sid and state != "Z":
                found.append((int(entry), state, args.strip()))
    return found


def _children(pid: int) -> bool:
    return bool(subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split())


def one_run(trace: Path, out: Path, delay: float) -> tuple[str, str]:
    """(outcome, details) of one interrupted analyze."""
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    p = subprocess.Popen([sys.executable, "-m", "moeprof", "analyze", str(trace), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while not _children(p.pid) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if p.poll() is not None:
        p.communicate()
        return "finished before the interrupt", ""
    time.sleep(delay)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    left = _session(p.pid)
    wait = time.monotonic() + 10
    while left and time.monotonic() < wait:
        time.sleep(0.1)
        left = _session(p.pid)
    lines = err.strip().splitlines()
    if p.returncode != 130:
        return f"exit {p.returncode}", err
    if any(x.startswith(("Traceback", "KeyboardInterrupt", "Exception ignored")) for x in lines):
        return "a Python traceback", err
    if lines[-1:] != ["Aborted."] or err.count("Aborted.") != 1:
        return "not one final Aborted.", err
    if out.exists():
        return "output left at --out", err
    if left:
        return "processes still running", repr(left)
    return "clean", ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=HERE.parent / "sample_data" / "trace")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--delay", type=float, default=0.4, help="seconds after the zygote starts (jittered 0.7-1.3x)")
    args = ap.parse_args()
    # Started as a shell's background job, this process ignores SIGINT, and so would each command it starts
    # (exec keeps an ignored signal ignored): Python's own handler here gives them the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    outcomes: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"a{i}"
            outcome, details = one_run(args.trace, out, args.delay * (0.7 + 0.6 * (i % 5) / 4))
            shutil.rmtree(out, ignore_errors=True)
            outcomes[outcome] += 1
            if outcome not in ("clean", "finished before the interrupt"):
                print(f"run {i}: {outcome}\n{details}", flush=True)
            if (i + 1) % 25 == 0:
                print(f"{i + 1} runs: " + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()), flush=True)
    print(f"{args.runs} runs: " + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))


if __name__ == "__main__":
    main()
