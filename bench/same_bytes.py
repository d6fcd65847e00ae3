"""Check that `moeprof analyze` writes byte-identical outputs under two installs of moeprof.

    python bench/same_bytes.py --baseline /work/main/.venv/bin/python TRACE [TRACE ...]

Runs ``analyze(TRACE, out=...)`` (what ``moeprof analyze --out`` writes, less the plots) once with this
interpreter and once with ``--baseline`` (a virtual environment holding another checkout, e.g. main),
each in a fresh process, into two temporary directories, and compares the sha256 of summary.json and of
every table. Prints one line per trace and exits 1 if any file differs or exists on one side only.
Stricter than bench/same_analysis.py (which allows float rounding): a speed-up that must not change a
single number is checked here.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

_RUN = """
import sys
from pathlib import Path
from moeprof.analysis.run import analyze
analyze(sys.argv[1], out=Path(sys.argv[2]), force=True)
"""


def digests(out: Path) -> dict[str, str]:
    """sha256 of every file under ``out``, by path relative to it."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def run(python: str, trace: str, out: Path) -> dict[str, str]:
    # -P: import moeprof from the interpreter's environment, not from the current directory
    res = subprocess.run([python, "-P", "-c", _RUN, trace, str(out)], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{python} on {trace}:\n{res.stderr}")
    return digests(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, metavar="PYTHON", help="interpreter of the other install")
    ap.add_argument("traces", nargs="+")
    args = ap.parse_args()
    bad = 0
    with tempfile.TemporaryDirectory(prefix="moeprof-same-bytes-") as tmp:
        for n, trace in enumerate(args.traces):
            mine = run(sys.executable, trace, Path(tmp) / f"{n}-this")
            theirs = run(args.baseline, trace, Path(tmp) / f"{n}-baseline")
            differ = sorted(name for name in set(mine) | set(theirs) if mine.get(name) != theirs.get(name))
            bad += bool(differ)
            print(f"{trace}: {len(mine)} files, " + (f"DIFFER: {', '.join(differ)}" if differ else "all identical"))
    print("byte-identical" if not bad else f"{bad} trace(s) differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
