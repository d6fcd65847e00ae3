"""Start-up time of the `moeprof` command: this checkout against a baseline git ref, side by side.

Each case runs `python -c "moeprof.commands.main.main(ARGS)"` in a fresh interpreter (what the
`moeprof` console script does) and reports the median wall time of --runs runs, alternating the two
checkouts. "Own work starting" runs a command on an input that does not exist: the process imports
what the command needs, starts the command's work, and stops at the first read (exit 2).

    python bench/startup_bench.py                  # this tree against where it left `main`
    python bench/startup_bench.py --baseline HEAD~5 --runs 7

The baseline is exported with `git archive` into a temporary directory laid out as the installed
package (commands/ becomes moeprof/commands), and put first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/moeprof-startup-bench"

# "starts": the process is stopped the moment typer calls the command's function (its own work
# begins). "missing input": the command runs on an input that does not exist, so it also imports the
# library it needs and stops at its first read (exit 2).
CASES = [
    ("moeprof --help", ["--help"]),
    ("moeprof --version", ["--version"]),
    ("moeprof analyze --help", ["analyze", "--help"]),
    ("moeprof simulate --help", ["simulate", "--help"]),
    ("inspect: starts", ["inspect", MISSING], "inspect"),
    ("analyze: starts", ["analyze", MISSING], "analyze"),
    ("simulate --placement: starts", ["simulate", MISSING, "--placement", MISSING], "simulate"),
    ("check: starts", ["check", MISSING, "--max-imbalance", "4"], "check"),
    ("inspect: missing input", ["inspect", MISSING]),
    ("analyze: missing input", ["analyze", MISSING]),
    ("simulate --placement: missing input", ["simulate", MISSING, "--placement", MISSING]),
    ("check: missing input", ["check", MISSING, "--max-imbalance", "4"]),
    ("import: missing input", ["import", "jsonl", MISSING]),
]

# Replace the command's function by one with the same signature that exits at once, before main.py
# registers it (typer reads the signature through __wrapped__).
STOP_AT_START = """
import functools, importlib, os, sys
mod = importlib.import_module("moeprof.commands.{module}")
orig = getattr(mod, "{module}")
@functools.wraps(orig)
def started(*a, **k):
    os._exit(0)
setattr(mod, "{module}", started)
from moeprof.commands.main import main
sys.exit(main({args!r}))
"""
BARE = ("numpy+polars+pyarrow+typer+rich (reference)",
        "import numpy, polars, pyarrow, typer, rich")


def export_baseline(ref: str, into: Path) -> Path:
    """``git archive REF`` laid out as the installed package; returns the directory for PYTHONPATH."""
    tar = into / "src.tar"
    with open(tar, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", ref], stdout=f, check=True)
    src = into / "src"
    with tarfile.open(tar) as t:
        t.extractall(src, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(src)
    site = into / "site"
    shutil.copytree(src / "moeprof", site / "moeprof")
    for pkg, sub in (("commands", "commands"), ("schemas", "schemas"), ("sample_data", "sample_data")):
        if (src / pkg).is_dir():
            shutil.copytree(src / pkg, site / "moeprof" / sub, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("trace", "tiny-moe"))
    return site


def run_once(args: list[str], pythonpath: str | None, code: str | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds of one fresh process; CPU (user + sys) barely moves when other jobs share the cores."""
    env = dict(os.environ, COLUMNS="120")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    code = code or f"import sys; from moeprof.commands.main import main; sys.exit(main({args!r}))"
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=None,
                    help="git ref to compare with (default: where this branch left main, git merge-base HEAD main)")
    ap.add_argument("--runs", type=int, default=5, help="runs per case and checkout; medians are reported")
    a = ap.parse_args()
    if a.baseline is None:
        a.baseline = subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], capture_output=True,
                                    text=True, check=True).stdout.strip()[:10]
    with tempfile.TemporaryDirectory(prefix="moeprof-startup-") as tmp:
        base = str(export_baseline(a.baseline, Path(tmp)))
        # This tree, laid out the same way, so that both sides load the same way (no editable finder).
        here = str(export_working_tree(Path(tmp) / "here"))
        print(f"python {sys.version.split()[0]}; median of {a.runs} runs, alternating; seconds of a fresh process "
              f"(wall, and CPU = user + sys; on a busy machine compare CPU); before = {a.baseline}")
        print(f"{'case':42} {'wall before':>11} {'wall here':>10} {'ratio':>6}  "
              f"{'CPU before':>10} {'CPU here':>9} {'ratio':>6}")
        run_once([], None, BARE[1])
        ref = [run_once([], None, BARE[1]) for _ in range(a.runs)]
        rw, rc = statistics.median(w for w, _ in ref), statistics.median(c for _, c in ref)
        print(f"{BARE[0]:42} {rw:11.3f} {'':>10} {'':>6}  {rc:10.3f}")
        for name, args, *stop in CASES:
            code = STOP_AT_START.format(module=stop[0], args=args) if stop else None
            run_once(args, base, code), run_once(args, here, code)  # writes __pycache__ of both copies
            before, after = [], []
            for _ in range(a.runs):
                before.append(run_once(args, base, code))
                after.append(run_once(args, here, code))
            bw, tw = statistics.median(w for w, _ in before), statistics.median(w for w, _ in after)
            bc, tc = statistics.median(c for _, c in before), statistics.median(c for _, c in after)
            print(f"{name:42} {bw:11.3f} {tw:10.3f} {bw / tw:5.1f}×  {bc:10.3f} {tc:9.3f} {bc / tc:5.1f}×",
                  flush=True)

def export_working_tree(into: Path) -> Path:
    site = into / "site"
    shutil.copytree(ROOT / "moeprof", site / "moeprof", ignore=shutil.ignore_patterns("__pycache__"))
    for pkg in ("commands", "schemas", "sample_data"):
        shutil.copytree(ROOT / pkg, site / "moeprof" / pkg, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "trace", "tiny-moe"))
    return site


if __name__ == "__main__":
    main()
