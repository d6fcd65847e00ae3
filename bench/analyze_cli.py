"""What a user waits for: `moeprof analyze TRACE` end to end (the command line, imports, statistics,
tables printed), and with `--out` (summary, tables and the report layer's plots), in alternating rounds.

    python bench/analyze_cli.py bench/out/trace-1000000 --baseline MAIN/bin/moeprof --repeats 5

TRACE is a trace written by bench/analyze_bench.py (or any). ``--baseline`` names another install's
``moeprof`` (e.g. the main branch's virtual environment) timed in the same rounds. Prints the median
[min - max] wall seconds of each arm and its CPU seconds (the command and every process it started:
figure workers included; less sensitive to a shared machine's load than wall time), the median
[min - max] of each round's ratio this / baseline, and the load average.

``--exit-gc-freeze`` adds an arm: this checkout's ``--out`` with ``gc.freeze()`` once the command is
done, so that the interpreter's last garbage collections at exit skip every object still alive (what
that exit costs), and its ratio to this checkout's ``--out`` round by round.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# The command line's own entry point, then gc.freeze() before the interpreter exits.
EXIT_GC_FREEZE = """
import gc, sys
from moeprof.commands.main import main
sys.argv[0] = "moeprof"
try:
    code = main()
finally:
    gc.freeze()
sys.exit(code)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--baseline", metavar="MOEPROF", help="another install's moeprof executable, timed alike")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--exit-gc-freeze", action="store_true", help="also time --out with gc.freeze() at exit")
    args = ap.parse_args()
    here = str(Path(sys.executable).parent / "moeprof")
    installs = {"this checkout": here} | ({"baseline": args.baseline} if args.baseline else {})
    tmp = Path(tempfile.mkdtemp(prefix="analyze-cli-"))
    arms = {}
    for name, exe in installs.items():
        arms[f"{name}, --out (summary, tables, plots)"] = [exe, "analyze", args.trace, "--out", str(tmp / name),
                                                           "--force", "--json"]
        arms[f"{name}, tables in the terminal"] = [exe, "analyze", args.trace]
        if name == "this checkout":  # the figure formats asked for (the baseline may lack --figures)
            for figures in ("png", "none"):
                arms[f"{name}, --out --figures {figures}"] = [exe, "analyze", args.trace, "--out",
                                                             str(tmp / f"{name}-{figures}"), "--force", "--json",
                                                             "--figures", figures]
    if args.exit_gc_freeze:
        arms["this checkout, --out, gc.freeze() at exit"] = [sys.executable, "-c", EXIT_GC_FREEZE, "analyze", args.trace,
                                                              "--out", str(tmp / "freeze"), "--force", "--json"]
    times: dict[str, list[float]] = {k: [] for k in arms}
    cpus: dict[str, list[float]] = {k: [] for k in arms}
    print("load average at the start", " ".join(f"{x:.1f}" for x in os.getloadavg()))
    try:
        for round_ in range(args.repeats):
            # The installs take turns going first in a round (what runs first may find the cores cooler).
            order = sorted(arms.items(), key=lambda kv: ("baseline" in kv[0]) == (round_ % 2 == 0))
            for name, cmd in order:
                r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
                subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
                times[name].append(time.perf_counter() - t0)
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants: its workers too
                cpus[name].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, xs in times.items():
        ys = cpus[name]
        print(f"{name:45s} {statistics.median(xs):.2f} s [{min(xs):.2f} - {max(xs):.2f}], "
              f"CPU {statistics.median(ys):.2f} s [{min(ys):.2f} - {max(ys):.2f}]")
    if args.baseline:  # each round's ratio: the rounds alternate, so a load that changes hits both arms alike
        for what in ("--out (summary, tables, plots)", "tables in the terminal"):
            for kind, got in (("wall", times), ("CPU", cpus)):
                ratios = [a / b for a, b in zip(got[f"this checkout, {what}"], got[f"baseline, {what}"])]
                print(f"this / baseline, {what:31s} {kind:4s} {statistics.median(ratios):.2f}x "
                      f"[{min(ratios):.2f} - {max(ratios):.2f}] over {len(ratios)} rounds")
    if args.exit_gc_freeze:
        for kind, got in (("wall", times), ("CPU", cpus)):
            ratios = [a / b for a, b in zip(got["this checkout, --out, gc.freeze() at exit"],
                                            got["this checkout, --out (summary, tables, plots)"])]
            print(f"gc.freeze() at exit / without, --out {kind:4s} {statistics.median(ratios):.2f}x "
                  f"[{min(ratios):.2f} - {max(ratios):.2f}] over {len(ratios)} rounds")
    print("load average at the end", " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
