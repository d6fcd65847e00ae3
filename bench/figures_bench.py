"""What drawing the six figures of ``analyze --out`` costs, this checkout against another install, in CPU
seconds (less sensitive to a shared machine's load than wall time), in alternating rounds.

    python bench/figures_bench.py bench/out/trace-1000000 --baseline MAIN/bin/python --repeats 3

Each round starts one fresh interpreter per install that analyses TRACE (not timed), then times
importing ``moeprof.report.plots`` (matplotlib) and drawing every figure as PNG and SVG in that process
(``plots.analysis_plots``, the in-process writer; ``analyze --out`` draws the same figures in worker
processes). Prints the median [min - max] CPU seconds of each arm, the ratio this / baseline, and the
load average.

``--per-figure`` times instead each figure alone, as PNG, as SVG and as both (what a worker draws), in
the same interpreters: the median CPU seconds of ``--repeats`` drawings after one not timed, each arm's
and the ratio this / baseline.

``--workers 0,1,2`` times instead the whole ``analyze(TRACE, out=...)`` library call with its figures
drawn in this process (0) or by a :class:`moeprof.report.figures.FigureWriter` of 1, 2 workers started
before the analysis (before polars is imported, as the command line does: forked), each figure drawn as
soon as its statistics are done: wall seconds and CPU seconds of the process and its workers, from the
interpreter's start (imports included); with ``--baseline``, the other install's in the same rounds
(taking turns to go first) and each round's ratio this / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
from moeprof.analysis.run import analyze_trace
analysis = analyze_trace(sys.argv[1])
t0 = time.process_time()
from moeprof.report import plots
t1 = time.process_time()
files = plots.analysis_plots(analysis, Path(tempfile.mkdtemp(prefix="figures-bench-")))
t2 = time.process_time()
print(json.dumps({"import": t1 - t0, "draw": t2 - t1, "files": len(files)}))
"""


PER_FIGURE = r"""
import json, statistics, sys, time
from moeprof.analysis.run import analyze_trace
from moeprof.report import figures, plots
inputs = figures.figure_inputs(analyze_trace(sys.argv[1]))
plots.warm_up()
got = {}
for name, part in inputs.items():
    for formats in (("png",), ("svg",), ("png", "svg")):
        plots.render(name, part, formats)  # fonts, caches: the first drawing is not timed
        times = []
        for _ in range(int(sys.argv[2])):
            t0 = time.process_time()
            plots.render(name, part, formats)
            times.append(time.process_time() - t0)
        got[name + " " + "+".join(formats)] = statistics.median(times)
print(json.dumps(got))
"""


WHOLE = r"""
import json, resource, sys, tempfile, time
t0 = time.perf_counter()
from pathlib import Path


def main():
    n = int(sys.argv[2])
    out = Path(tempfile.mkdtemp(prefix="figures-bench-")) / "a"
    if n == 0:
        from moeprof.analysis.run import analyze
        from moeprof.report.plots import write_plots
        analyze(sys.argv[1], out=out, writers=[write_plots])
    else:
        from moeprof.report.figures import FigureWriter
        with FigureWriter(processes=n) as figures:  # started before polars is imported, as the command line does
            from moeprof.analysis.run import analyze
            analyze(sys.argv[1], out=out, writers=[figures])
    wall = time.perf_counter() - t0
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    print(json.dumps({"wall": wall, "cpu": cpu, "files": len(list((out / "plots").iterdir()))}))


if __name__ == "__main__":  # the workers import this module again
    main()
"""


def _whole(trace: str, workers: list[int], repeats: int, arms: dict[str, str]) -> None:
    script = Path(tempfile.mkdtemp(prefix="figures-bench-")) / "whole.py"
    script.write_text(WHOLE, encoding="utf-8")
    got: dict[tuple[str, int], list[dict]] = {(arm, n): [] for n in workers for arm in arms}
    for round_ in range(repeats):
        for n in workers:
            for arm in (list(arms) if round_ % 2 == 0 else list(arms)[::-1]):  # each install first in turn
                out = subprocess.run([arms[arm], str(script), trace, str(n)], capture_output=True, text=True,
                                     check=True, cwd=tempfile.gettempdir())
                got[arm, n].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for (arm, n), rows in got.items():
        what = "figures in this process" if n == 0 else f"figures in {n} worker{'s' if n > 1 else ''}"
        line = [f"{arm:14s} {what:26s}"]
        for key in ("wall", "cpu"):
            xs = [r[key] for r in rows]
            line.append(f"{key} {statistics.median(xs):.2f} s [{min(xs):.2f} - {max(xs):.2f}]")
        print("  ".join(line) + f"  ({rows[0]['files']} files)")
    if len(arms) > 1:
        for n in workers:
            line = [f"this / baseline, {n} worker{'s' if n != 1 else ''}:"]
            for key in ("wall", "cpu"):
                ratios = [a[key] / b[key] for a, b in zip(got["this checkout", n], got["baseline", n])]
                line.append(f"{key} {statistics.median(ratios):.2f}x [{min(ratios):.2f} - {max(ratios):.2f}]")
            print("  ".join(line))


def _per_figure(trace: str, arms: dict[str, str], repeats: int) -> None:
    got = {}
    for name, python in arms.items():
        out = subprocess.run([python, "-c", PER_FIGURE, trace, str(repeats)], capture_output=True, text=True, check=True,
                             cwd=tempfile.gettempdir())
        got[name] = json.loads(out.stdout.strip().splitlines()[-1])
    names = list(arms)
    print(f"{'figure, formats':36s}" + "".join(f"{n:>15s}" for n in names) + ("   this / baseline" if len(names) > 1 else ""))
    totals = {n: 0.0 for n in names}
    for key in got[names[0]]:
        row = [got[n].get(key, float("nan")) for n in names]
        if key.endswith("png+svg"):
            for n, v in zip(names, row):
                totals[n] += v
        print(f"{key:36s}" + "".join(f"{v:13.3f} s" for v in row) + (f"   {row[0] / row[1]:.2f}×" if len(row) > 1 else ""))
    row = [totals[n] for n in names]
    print(f"{'all six, png+svg':36s}" + "".join(f"{v:13.3f} s" for v in row) + (f"   {row[0] / row[1]:.2f}×" if len(row) > 1 else ""))


def _run(python: str, trace: str) -> dict:
    out = subprocess.run([python, "-c", CHILD, trace], capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir())  # not a checkout's root: its moeprof/ would shadow the install
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--baseline", metavar="PYTHON", help="another install's python executable")
    ap.add_argument("--workers", metavar="N,N", help="time analyze --out with this many figure workers (0: none)")
    ap.add_argument("--per-figure", action="store_true", help="time each figure alone, per format")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    trace = str(Path(args.trace).resolve())
    if args.workers:
        print("load average at the start", " ".join(f"{x:.1f}" for x in os.getloadavg()))
        _whole(trace, [int(n) for n in args.workers.split(",")], args.repeats,
               {"this checkout": sys.executable} | ({"baseline": args.baseline} if args.baseline else {}))
        print("load average at the end", " ".join(f"{x:.1f}" for x in os.getloadavg()))
        return
    if args.per_figure:
        print("load average at the start", " ".join(f"{x:.1f}" for x in os.getloadavg()))
        _per_figure(trace, {"this checkout": sys.executable} | ({"baseline": args.baseline} if args.baseline else {}),
                    args.repeats)
        print("load average at the end", " ".join(f"{x:.1f}" for x in os.getloadavg()))
        return
    if not args.baseline:
        ap.error("give --baseline PYTHON (or --workers, --per-figure)")
    arms = {"this checkout": sys.executable, "baseline": args.baseline}
    got: dict[str, list[dict]] = {k: [] for k in arms}
    print("load average at the start", " ".join(f"{x:.1f}" for x in os.getloadavg()))
    for _ in range(args.repeats):
        for name, python in arms.items():
            got[name].append(_run(python, trace))
    med = {}
    for name, rows in got.items():
        for key in ("import", "draw"):
            xs = [r[key] for r in rows]
            med[name, key] = statistics.median(xs)
            print(f"{name:14s} {key:6s} CPU {med[name, key]:.2f} s [{min(xs):.2f} - {max(xs):.2f}]"
                  + (f"  ({rows[0]['files']} files)" if key == "draw" else ""))
    for key in ("import", "draw"):
        print(f"this / baseline, {key}: {med['this checkout', key] / med['baseline', key]:.2f}×")
    print("load average at the end", " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
