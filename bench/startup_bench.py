"""Start-up time of the `moeprof` command: this checkout against a baseline git ref, side by side.

Each case runs `python -c "moeprof.commands.main.main(ARGS)"` in a fresh interpreter (what the
`moeprof` console script does) and reports the median wall time of --runs runs, alternating the two
checkouts. "Own work starting" runs a command on an input that does not exist: the process imports
what the command needs, starts the command's work, and stops at the first read (exit 2).

    python bench/startup_bench.py                  # this tree against `main`
    python bench/startup_bench.py --baseline HEAD~5 --runs 7

The baseline is exported with `git archive` into a temporary directory laid out as the installed
package (commands/ becomes moeprof/commands), and put first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
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

CASES = [
    ("moeprof --help", ["--help"]),
    ("moeprof --version", ["--version"]),
    ("moeprof analyze --help", ["analyze", "--help"]),
    ("moeprof simulate --help", ["simulate", "--help"]),
    ("inspect: own work starts", ["inspect", MISSING]),
    ("analyze: own work starts", ["analyze", MISSING]),
    ("simulate --placement: own work starts", ["simulate", MISSING, "--placement", MISSING]),
    ("check: own work starts", ["check", MISSING, "--max-imbalance", "4"]),
    ("import: own work starts", ["import", "jsonl", MISSING]),
]
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


def run_once(args: list[str], pythonpath: str | None, code: str | None = None) -> float:
    env = dict(os.environ, COLUMNS="120")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    code = code or f"import sys; from moeprof.commands.main import main; sys.exit(main({args!r}))"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=tempfile.gettempdir())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="main", help="git ref to compare with (default: main)")
    ap.add_argument("--runs", type=int, default=5, help="runs per case and checkout; medians are reported")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="moeprof-startup-") as tmp:
        base = str(export_baseline(a.baseline, Path(tmp)))
        # This tree, laid out the same way, so that both sides load the same way (no editable finder).
        here = str(export_working_tree(Path(tmp) / "here"))
        print(f"python {sys.version.split()[0]}; median of {a.runs} runs, alternating; wall seconds")
        print(f"{'case':44} {a.baseline:>10} {'this tree':>10} {'ratio':>7}")
        run_once([], None, BARE[1])
        ref = statistics.median(run_once([], None, BARE[1]) for _ in range(a.runs))
        print(f"{BARE[0]:44} {ref:10.3f} {ref:10.3f} {'':>7}")
        for name, args in CASES:
            run_once(args, base), run_once(args, here)  # writes __pycache__ of both copies
            before, after = [], []
            for _ in range(a.runs):
                before.append(run_once(args, base))
                after.append(run_once(args, here))
            b, t = statistics.median(before), statistics.median(after)
            print(f"{name:44} {b:10.3f} {t:10.3f} {b / t:6.1f}×")


def export_working_tree(into: Path) -> Path:
    site = into / "site"
    shutil.copytree(ROOT / "moeprof", site / "moeprof", ignore=shutil.ignore_patterns("__pycache__"))
    for pkg in ("commands", "schemas", "sample_data"):
        shutil.copytree(ROOT / pkg, site / "moeprof" / pkg, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "trace", "tiny-moe"))
    return site


if __name__ == "__main__":
    main()
