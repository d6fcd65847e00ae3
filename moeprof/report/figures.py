"""Which figures an analysis supports, the data each one draws, and a writer that draws them in worker
processes.

Drawing is most of what ``analyze --out`` costs on a trace of a million rows, and matplotlib draws on
one core. :class:`FigureWriter` starts its workers before the analysis runs, so that they import
matplotlib while the trace is read; each figure goes to a worker as soon as the statistics it shows
are computed (:meth:`FigureWriter.prepare`, which the analysis calls as it goes), so that the
figures are drawn while the other statistics are computed (most of them on one core) and side by
side. A worker draws into memory; the files are written by the process that owns the output
directory. The process that computes the analysis does not import matplotlib (this module does
not). How many workers, and whether they are forked or spawned: :func:`_workers`, :func:`_start_method`.

Each figure gets only the part of the analysis it draws (:func:`figure_inputs`, a few hundred KiB at
256 experts), not the whole analysis with its tables.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

FORMATS = ("png", "svg")


def _batch_imbalance(s: dict) -> bool:
    return bool(s["batch_imbalance"].get("available")) and any(b.get("available") for b in s["batch_imbalance"]["batches"])


def _domain_shift(s: dict) -> bool:
    return bool(s["domain_shift"].get("available"))


def _prefill_decode(s: dict) -> bool:
    return bool(s["prefill_decode"].get("available"))


def _transitions(s: dict) -> bool:
    return bool(s["coactivation"].get("available") and s["coactivation"].get("transitions", {}).get("available"))


# name: (the summary entry that says whether the analysis supports it (None: every analysis does), when
# it does, the summary / tables / arrays entries it draws). In the order the figures are listed;
# DRAW_ORDER says which a worker takes first of those ready at once.
FIGURES: dict[str, tuple[str | None, Callable[[dict], bool], dict[str, tuple[str, ...]]]] = {
    "load_heatmap": (None, lambda s: True, {"arrays": ("layers", "load")}),
    "imbalance_vs_batch": ("batch_imbalance", _batch_imbalance, {"summary": ("batch_imbalance", "imbalance")}),
    "domain_js": ("domain_shift", _domain_shift, {"tables": ("domain_shift",), "arrays": ("domains", "layers")}),
    "domain_popularity": ("domain_shift", _domain_shift,
                          {"tables": ("domain_shift",), "arrays": ("domains", "layers", "domain_counts")}),
    "prefill_decode": ("prefill_decode", _prefill_decode, {"tables": ("prefill_decode",)}),
    "transitions": ("coactivation", _transitions, {"arrays": ("transition_cond", "transition_pair",
                                                              "transition_concentration", "top_k", "num_experts")}),
}
# Dearest to draw first (PNG + SVG at DeepSeek-V3's shape: the 8 panels of domain_js take about a quarter of
# the time), so that no worker starts a long figure when the others are nearly done.
DRAW_ORDER = ("domain_js", "transitions", "load_heatmap", "domain_popularity", "imbalance_vs_batch",
              "prefill_decode")
# More workers than this would not finish sooner: domain_js alone is about a quarter of the drawing.
MAX_WORKERS = 3


def supported(summary: dict) -> list[str]:
    """The figures ``summary`` supports, in the order of :data:`FIGURES`."""
    return [name for name, (_key, ok, _needs) in FIGURES.items() if ok(summary)]


def ready(name: str, analysis: Any) -> bool | None:
    """Whether figure ``name`` can be drawn from ``analysis`` as computed so far: True (supported, and
    every entry it draws is there), False (not supported: never drawn), None (not known yet)."""
    key, ok, needs = FIGURES[name]
    if key is not None and key not in analysis.summary:
        return None
    if not ok(analysis.summary):
        return False
    return all(k in getattr(analysis, part) for part, keys in needs.items() for k in keys) or None


def _inputs(name: str, analysis: Any) -> SimpleNamespace:
    needs = FIGURES[name][2]
    part = {p: {k: getattr(analysis, p)[k] for k in needs.get(p, ())} for p in ("summary", "tables", "arrays")}
    # Tables as plain columns: a worker that unpickled a polars frame would import polars for it.
    part["tables"] = {k: {c: frame[c].to_numpy() for c in frame.columns} for k, frame in part["tables"].items()}
    return SimpleNamespace(**part)


def figure_inputs(analysis: Any) -> dict[str, SimpleNamespace]:
    """Each figure ``analysis`` supports, with only the entries of ``analysis`` it draws (``summary``,
    ``tables``, ``arrays``, as in :class:`moeprof.analysis.run.Analysis`; each table a dict of numpy
    columns)."""
    return {name: _inputs(name, analysis) for name in supported(analysis.summary)}


def _workers(start_method: str = "spawn") -> int:
    """How many worker processes draw the figures: one more than the idle cores (the cores less those
    other programs keep busy, :func:`_busy_cores`; rounded), up to :data:`MAX_WORKERS` and the cores.
    Where less than half a core is idle: one forked worker (it imports matplotlib in place of this
    process, and draws while the analysis runs on the other threads), but no spawned one (a spawned
    worker imports numpy and moeprof again). Measured at 10⁶ rows on 2 cores with spawned workers (`bench/figures_bench.py --workers
    0,1,2`): busy (load 4.6–5.5), analyze --out took 4.09 s of CPU drawing here, 4.85 s with one worker
    and 5.64 s with two, and the most wall time with two; nearly idle (load 1.1–1.3, the benchmark's
    own runs), two workers took the least wall time, 2.87 s against 3.44 s here."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = cpus - _busy_cores()
    if idle < 0.5:
        return 1 if start_method == "fork" else 0
    return min(MAX_WORKERS, cpus, 1 + int(idle + 0.5))


def _busy_cores() -> float:
    """How many cores other programs keep busy: the 1-minute load average, but no more than the tasks
    running right now besides this one (the 4th field of /proc/loadavg). The load average also counts
    this program's own last minute, and a script that runs analyze on trace after trace (or a
    benchmark) would otherwise find its own cores busy each time it starts."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    running = _running_tasks()
    return load if running is None else min(load, max(running - 1, 0))


def _running_tasks() -> int | None:
    """Tasks running or ready to run on the machine now, this one included (None: not known here)."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def _start_method() -> str:
    """fork where this process runs one thread, else spawn. A forked worker starts as a copy of this
    process in milliseconds, with its imports; a spawned one is a fresh interpreter that imports
    moeprof again (and the program's main module). But a fork copies only the calling thread, and with
    it any lock another thread held at that moment (polars starts threads when it is imported, and a
    fork of a process that ran polars can deadlock in its thread pool): so only a process of one
    thread forks, as moeprof's command line is when it starts the workers, before it imports polars."""
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:  # no /proc: the threads cannot be counted
        return "spawn"
    if threads == 1 and threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"


def _start_worker() -> None:
    from moeprof.report import plots

    plots.warm_up()


def _render(name: str, inputs: SimpleNamespace, formats: tuple[str, ...]) -> dict[str, bytes]:
    from moeprof.report import plots

    return plots.render(name, inputs, formats)


class FigureWriter:
    """The figures of an analyze output directory (into ``OUT/plots``), in each of ``formats``: a writer
    for :func:`moeprof.analysis.run.analyze`, drawn by ``processes`` workers (by default as many as
    :func:`_workers` says; 0: in this process). Use it as a context manager around the analysis:
    entering starts the workers (and returns at once), leaving stops them::

        with FigureWriter(("png", "svg")) as figures:
            analyze(trace, out=out, writers=[figures])

    ``analyze`` calls :meth:`prepare` as statistics are computed, and each figure is sent to a worker as
    soon as what it draws is there. The workers are forked where this process runs one thread
    (:func:`_start_method`), else fresh interpreters (spawn); as with any spawned pool, the program's
    main module is then imported again in each worker: it must not run its work on import
    (``if __name__ == "__main__":``); moeprof's command line does not. A worker draws into memory and
    this process writes the files, once every figure is drawn: a figure that fails raises in the caller
    and no file is written (the figures being drawn finish, the others are cancelled).
    """

    def __init__(self, formats: tuple[str, ...] = FORMATS, processes: int | None = None) -> None:
        self.formats = tuple(formats)
        self.processes = _workers(_start_method()) if processes is None else processes  # 0: drawn here
        self._pool: ProcessPoolExecutor | None = None
        self._analysis: Any = None  # the analysis whose figures were sent to the workers
        self._jobs: dict[str, Future] = {}
        self._unsupported: set[str] = set()

    def __enter__(self) -> "FigureWriter":
        if self._pool is None and self.processes > 0:
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context(_start_method()),
                                             initializer=_start_worker)
            for _ in range(self.processes):  # spawn: each submit starts one more worker (fork: all at once)
                self._pool.submit(int)
        return self

    def __exit__(self, exc_type: Any, *_exc: Any) -> None:
        self.close(wait=exc_type is None)

    def close(self, wait: bool = True) -> None:
        """Stop the workers; with ``wait``, once they have exited."""
        pool, self._pool = self._pool, None
        self._jobs, self._analysis = {}, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)

    def prepare(self, analysis: Any) -> None:
        """Send each figure of ``analysis`` whose statistics are computed by now to a worker (the dearest
        first, :data:`DRAW_ORDER`). :func:`moeprof.analysis.run.analyze` calls this as it goes."""
        if self.processes == 0 or not self.formats:
            return
        self.__enter__()
        assert self._pool is not None
        if analysis is not self._analysis:  # another analysis: what was sent for the last one is not for it
            for job in self._jobs.values():
                job.cancel()
            self._analysis, self._jobs, self._unsupported = analysis, {}, set()
        for name in DRAW_ORDER:
            if name in self._jobs or name in self._unsupported:
                continue
            state = ready(name, analysis)
            if state:
                self._jobs[name] = self._pool.submit(_render, name, _inputs(name, analysis), self.formats)
            elif state is False:
                self._unsupported.add(name)

    def __call__(self, analysis: Any, out: Path) -> list[Path]:
        names = supported(analysis.summary)
        if not names or not self.formats:
            return []
        plots_dir = Path(out) / "plots"
        if self.processes == 0:
            from moeprof.report.plots import analysis_plots

            return analysis_plots(analysis, plots_dir, self.formats)
        self.prepare(analysis)  # the figures not sent yet (all of them, where analyze did not call prepare)
        try:
            drawn = {name: self._jobs[name].result() for name in names}
        except BaseException:
            # The figures being drawn finish, the others are not started; nothing was written.
            self.close(wait=True)
            raise
        plots_dir.mkdir(exist_ok=True)
        files = []
        for name in names:
            for file_name, data in drawn[name].items():
                files.append(plots_dir / file_name)
                files[-1].write_bytes(data)
        return files
