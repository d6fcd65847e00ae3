"""Which figures an analysis supports, the data each one draws, and a writer that draws them in worker
processes.

Drawing is most of what ``analyze --out`` costs on a trace of a million rows, and matplotlib draws on
one core. :class:`FigureWriter` starts its workers before the analysis runs, so that they import
matplotlib while the statistics are computed; once the analysis is done, each worker draws whole
figures (the dearest first), and the figures are drawn side by side; the process that computes the
analysis does not import matplotlib (this module does not). That pays where the machine has idle
cores; where its cores are busy, a worker's own imports cost more than they save, and the figures are
drawn in this process after the analysis (:func:`_workers`).

Each figure gets only the part of the analysis it draws (:func:`figure_inputs`, a few hundred KiB at
256 experts), not the whole analysis with its tables.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
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


# name: (when the summary supports it, the summary / tables / arrays entries it draws). In the order the
# figures are listed; DRAW_ORDER says which a worker takes first.
FIGURES: dict[str, tuple[Callable[[dict], bool], dict[str, tuple[str, ...]]]] = {
    "load_heatmap": (lambda s: True, {"arrays": ("layers", "load")}),
    "imbalance_vs_batch": (_batch_imbalance, {"summary": ("batch_imbalance", "imbalance")}),
    "domain_js": (_domain_shift, {"tables": ("domain_shift",), "arrays": ("domains", "layers")}),
    "domain_popularity": (_domain_shift, {"tables": ("domain_shift",), "arrays": ("domains", "layers", "domain_counts")}),
    "prefill_decode": (_prefill_decode, {"tables": ("prefill_decode",)}),
    "transitions": (_transitions, {"arrays": ("transition_cond", "transition_pair", "transition_concentration",
                                              "top_k", "num_experts")}),
}
# Dearest to draw first (PNG + SVG at DeepSeek-V3's shape: the 8 panels of domain_js take about a third of
# the time), so that no worker starts a long figure when the others are nearly done.
DRAW_ORDER = ("domain_js", "transitions", "load_heatmap", "domain_popularity", "imbalance_vs_batch",
              "prefill_decode")
# More workers than this would not finish sooner: domain_js alone is about a third of the drawing.
MAX_WORKERS = 3


def supported(summary: dict) -> list[str]:
    """The figures ``summary`` supports, in the order of :data:`FIGURES`."""
    return [name for name, (ok, _needs) in FIGURES.items() if ok(summary)]


def figure_inputs(analysis: Any) -> dict[str, SimpleNamespace]:
    """Each figure ``analysis`` supports, with only the entries of ``analysis`` it draws (``summary``,
    ``tables``, ``arrays``, as in :class:`moeprof.analysis.run.Analysis`; each table a dict of numpy
    columns)."""
    out = {}
    for name in supported(analysis.summary):
        needs = FIGURES[name][1]
        part = {p: {k: getattr(analysis, p)[k] for k in needs.get(p, ())} for p in ("summary", "tables", "arrays")}
        # Tables as plain columns: a worker that unpickled a polars frame would import polars for it.
        part["tables"] = {k: {c: frame[c].to_numpy() for c in frame.columns} for k, frame in part["tables"].items()}
        out[name] = SimpleNamespace(**part)
    return out


def _workers() -> int:
    """How many worker processes draw the figures: none (this process draws them) on a machine whose
    cores are all busy (load average at least the cores), else one more than the idle cores, up to
    :data:`MAX_WORKERS` and the cores. A worker imports numpy and matplotlib on its own: measured at
    10⁶ rows on 2 busy cores (`bench/figures_bench.py --workers 0,1,2`), analyze --out took 4.09 s of
    CPU drawing here, 4.85 s with one worker and 5.64 s with two, and the most wall time with two."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = cpus - (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    return 0 if idle < 1 else min(MAX_WORKERS, cpus, 1 + int(idle))


def _start_worker() -> None:
    from moeprof.report import plots

    plots.warm_up()


def _draw(name: str, inputs: SimpleNamespace, out: Path, formats: tuple[str, ...]) -> list[Path]:
    from moeprof.report import plots

    return plots.draw(name, inputs, out, formats)


class FigureWriter:
    """The figures of an analyze output directory (into ``OUT/plots``), in each of ``formats``: a writer
    for :func:`moeprof.analysis.run.analyze`, drawn by ``processes`` workers (by default as many as
    :func:`_workers` says; 0: in this process). Use it as a context manager around the analysis:
    entering starts the workers (and returns at once), leaving stops them::

        with FigureWriter(("png", "svg")) as figures:
            analyze(trace, out=out, writers=[figures])

    The workers are fresh interpreters (spawn): a fork of this process could deadlock in polars' thread
    pool, and a fork server imports from the directory it was started in, which may hold another
    moeprof. As with any spawned pool, the program's main module is imported again in each worker: it
    must not run its work on import (``if __name__ == "__main__":``); moeprof's command line does not. A figure that fails raises in the caller once the figures being drawn are done and the
    others cancelled: no worker writes into the output directory after the call has returned or raised.
    """

    def __init__(self, formats: tuple[str, ...] = FORMATS, processes: int | None = None) -> None:
        self.formats = tuple(formats)
        self.processes = _workers() if processes is None else processes  # 0: drawn in this process
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "FigureWriter":
        if self._pool is None and self.processes > 0:
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker)
            for _ in range(self.processes):  # each submit starts one more worker, while none is idle
                self._pool.submit(int)
        return self

    def __exit__(self, exc_type: Any, *_exc: Any) -> None:
        self.close(wait=exc_type is None)

    def close(self, wait: bool = True) -> None:
        """Stop the workers; with ``wait``, once they have exited."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)

    def __call__(self, analysis: Any, out: Path) -> list[Path]:
        inputs = figure_inputs(analysis)
        if not inputs or not self.formats:
            return []
        plots_dir = Path(out) / "plots"
        if self.processes == 0:
            from moeprof.report.plots import analysis_plots

            return analysis_plots(analysis, plots_dir, self.formats)
        self.__enter__()
        assert self._pool is not None
        plots_dir.mkdir(exist_ok=True)
        jobs = {name: self._pool.submit(_draw, name, inputs[name], plots_dir, self.formats)
                for name in DRAW_ORDER if name in inputs}
        try:
            files = {name: job.result() for name, job in jobs.items()}
        except BaseException:
            # The figures being drawn finish, the others are not started: then the caller may remove the
            # directory, which no worker writes into any more.
            self.close(wait=True)
            raise
        return [p for name in inputs for p in files[name]]
