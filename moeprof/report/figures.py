"""Which figures an analysis supports, the data each one draws, and a writer that draws them in worker
processes.

Drawing is most of what ``analyze --out`` costs on a trace of a million rows, and matplotlib draws on
one core. :class:`FigureWriter` starts one process before the analysis runs, the zygote, which imports
matplotlib while the trace is read and then forks the workers that draw (:func:`_serve`): each starts
with matplotlib imported and its fonts loaded, so the import (about as much CPU as two of the six
figures) is paid once, not once a worker. Each figure goes to the zygote as soon as the statistics it
shows are computed (:meth:`FigureWriter.prepare`, which the analysis calls as it goes), and from it to
the next idle worker, the dearest first, so that the figures are drawn while the other statistics are
computed (most of them on one core) and side by side. A worker draws into memory; the files are
written by the process that owns the output directory. The process that computes the analysis does not
import matplotlib (this module does not). How many workers, and whether the zygote is forked or
spawned: :func:`_workers`, :func:`_start_method`.

Each figure gets only the part of the analysis it draws (:func:`figure_inputs`, a few hundred KiB at
256 experts), not the whole analysis with its tables.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import threading
import time
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
# Dearest to draw first, so that no worker starts a long figure when the others are nearly done: CPU
# seconds of PNG + SVG at DeepSeek-V3's shape, 10^6 rows (bench/figures_bench.py --per-figure, load 2.0-2.5):
# domain_js 0.30, transitions 0.26, domain_popularity 0.20, load_heatmap 0.17, prefill_decode 0.14,
# imbalance_vs_batch 0.11.
DRAW_ORDER = ("domain_js", "transitions", "domain_popularity", "load_heatmap", "prefill_decode",
              "imbalance_vs_batch")
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
    Where the zygote is forked, at least two (one where there is one core): it imports matplotlib in
    place of this process, and a second worker costs it a fork, not an import (at 10⁶ rows, load 2.3–2.5,
    `bench/figures_bench.py --workers 1,2`: analyze with its figures took 1.68 s with two workers
    against 2.01 s with one, for 3.18 s of CPU against 3.03 s). Where less than half a core is idle, no
    spawned zygote (a fresh interpreter imports numpy and moeprof again): drawn in this process."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = cpus - _busy_cores()
    if start_method == "fork":
        return min(MAX_WORKERS, cpus, max(2, 1 + int(idle + 0.5)))
    if idle < 0.5:
        return 0
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


# In the first worker (the zygote): the queue the writer sends figures on and the writer's process id
# (_start_zygote sets them).
_queue: Any = None
_writer_pid = 0
# How often the zygote checks that the writer's process still runs, and a drawing worker that the zygote
# that forked it does (seconds); how often the zygote looks for an idle worker while figures wait.
_WATCH_S = 0.2
_POLL_S = 0.005


def _start_zygote(queue: Any) -> None:
    """The first worker's start: import matplotlib and draw a small figure once (fonts, caches), so that
    the workers it forks (:func:`_serve`) start warm, with none of that to do again."""
    global _queue, _writer_pid
    # Ctrl-C reaches every process of the terminal's group: the writer's process stops the zygote (its
    # workers follow it, _watch_zygote), which would otherwise print a KeyboardInterrupt traceback of its
    # own. SIGTERM ends it as before, whatever handler the command installed before forking it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _queue, _writer_pid = queue, os.getppid()
    # Drawing does no linear algebra: numpy's BLAS (OpenBLAS) would start threads when it is imported,
    # and a process with threads does not fork (_start_method).
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    from moeprof.report import plots

    plots.warm_up()


def _watch_zygote(zygote: int) -> None:
    """A drawing worker's start: exit when the zygote that forked it is gone. Each worker holds, from the
    fork, the zygote's end of the pipe that tells the writer's process that the zygote exited: a zygote
    that was killed would not be seen to exit while its workers wait for figures that never come."""

    def watch() -> None:
        while os.getppid() == zygote:
            time.sleep(_WATCH_S)
        os._exit(1)

    threading.Thread(target=watch, name="moeprof-zygote-watch", daemon=True).start()


def _render(name: str, inputs: bytes, formats: tuple[str, ...]) -> dict[str, bytes]:
    from moeprof.report import plots

    return plots.render(name, pickle.loads(inputs), formats)


def _next_message(timeout: float) -> tuple | None:
    """The writer's next message (None: none came within ``timeout`` seconds); exits this process (the
    zygote) once the writer's process is gone."""
    import queue

    try:
        return _queue.get(timeout=timeout)
    except queue.Empty:
        if os.getppid() != _writer_pid:  # its workers exit too (_watch_zygote)
            os._exit(1)
        return None


def _failure(jobs: dict[str, Future]) -> BaseException | None:
    return next((job.exception() for job in jobs.values() if job.done() and not job.cancelled() and job.exception()),
                None)


def _dispatch(pool: ProcessPoolExecutor, processes: int, waiting: dict[str, bytes], jobs: dict[str, Future],
              formats: tuple[str, ...]) -> None:
    """Give each idle worker the dearest figure waiting (:data:`DRAW_ORDER`), none once one failed. The
    pool gets a figure only when a worker is idle: its queue is first come first served, and the figures
    done last (co-activation's) would wait behind cheaper ones sent before."""
    while waiting and sum(not job.done() for job in jobs.values()) < processes and _failure(jobs) is None:
        name = min(waiting, key=DRAW_ORDER.index)
        jobs[name] = pool.submit(_render, name, waiting.pop(name), formats)


def _collect(names: list[str], jobs: dict[str, Future]) -> dict[str, dict[str, bytes]]:
    """The figures ``names``, drawn; the first that failed (in their order) raises."""
    for name in names:
        if name not in jobs:  # not drawn: one failed before its turn, or it was never sent
            failure = _failure(jobs)
            if failure is None:
                raise RuntimeError(f"figure {name} was not sent to be drawn")
            raise failure
        jobs[name].exception()  # wait for it
    return {name: jobs[name].result() for name in names}


def _serve(session: int, processes: int, formats: tuple[str, ...]) -> dict[str, dict[str, bytes]] | None:
    """In the zygote: draw the figures of one analysis as the writer sends them, by ``processes`` workers
    forked from this process (warm: matplotlib imported, fonts loaded), or here where that is one or
    this process cannot fork. Messages: ``("draw", session, name, pickled inputs)``; ``("end", session,
    names)``: the figures drawn, by name (the first that failed raises); ``("cancel", session)``: None.
    The zygote never unpickles a figure's inputs (a worker does): whatever they hold reaches a worker."""
    pool = None
    if processes > 1 and _start_method() == "fork":
        # What this process made is left out of the workers' garbage collections: they share its pages
        # rather than copy each one a collection writes to (about 3% of analyze --out's CPU).
        gc.freeze()
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_watch_zygote, initargs=(os.getpid(),))
        pool.submit(int)  # forks them all now, before the first figure comes (a forking pool starts all at once)
    waiting: dict[str, bytes] = {}  # sent, for the next idle worker
    jobs: dict[str, Future] = {}  # given to a worker, or drawn here
    end: list[str] | None = None  # the figures to return, once the writer has sent them all
    try:
        while True:
            if pool is not None:
                _dispatch(pool, processes, waiting, jobs, formats)
            if end is not None and not (waiting and _failure(jobs) is None):
                return _collect(end, jobs)
            message = _next_message(_POLL_S if waiting else _WATCH_S)
            if message is None:
                continue
            kind, sid, *rest = message
            if sid != session:  # sent for an analysis before this one
                continue
            if kind == "cancel":
                return None
            if kind == "end":
                end = rest[0]
                continue
            name, inputs = rest
            if pool is not None:
                waiting[name] = inputs
            elif _failure(jobs) is None:  # drawn here, as they come; none once one failed
                jobs[name] = job = Future()
                try:
                    job.set_result(_render(name, inputs, formats))
                except Exception as e:
                    job.set_exception(e)
    finally:
        if pool is not None:
            # The figures being drawn finish, the others are not started. Waited for here: a worker
            # process exits its children before its threads, and this pool's thread tells them to exit.
            pool.shutdown(wait=True, cancel_futures=True)


_CLOSED_QUEUES: list[Any] = []
"""Queues of writers closed without waiting for their zygote (:meth:`FigureWriter.close`)."""


class FigureWriter:
    """The figures of an analyze output directory (into ``OUT/plots``), in each of ``formats``: a writer
    for :func:`moeprof.analysis.run.analyze`, drawn by ``processes`` workers (by default as many as
    :func:`_workers` says; 0: in this process). Use it as a context manager around the analysis:
    entering starts the workers (and returns at once), leaving stops them::

        with FigureWriter(("png", "svg")) as figures:
            analyze(trace, out=out, writers=[figures])

    ``analyze`` calls :meth:`prepare` as statistics are computed, and each figure is sent to a worker as
    soon as what it draws is there. One process is started (the zygote): forked where this process
    runs one thread (:func:`_start_method`), else a fresh interpreter (spawn); as with any spawned
    pool, the program's main module is then imported again in it: it must not run its work on import
    (``if __name__ == "__main__":``); moeprof's command line does not. The zygote imports matplotlib
    once and forks the workers that draw (:func:`_serve`): matplotlib's import costs about as much CPU
    as two of the six figures, and is paid once, not once a worker. A worker draws into memory and
    this process writes the files, once every figure is drawn: a figure that fails raises in the
    caller and no file is written (the figures being drawn finish, the others are cancelled); a worker
    or the zygote that dies raises :class:`concurrent.futures.process.BrokenProcessPool`.
    """

    def __init__(self, formats: tuple[str, ...] = FORMATS, processes: int | None = None) -> None:
        self.formats = tuple(formats)
        self.processes = _workers(_start_method()) if processes is None else processes  # 0: drawn here
        self._pool: ProcessPoolExecutor | None = None  # of one process: the zygote
        self._queue: Any = None  # the figures to draw, to the zygote
        self._job: Future | None = None  # the zygote's _serve of the analysis being drawn
        self._session = 0  # which analysis the zygote draws (messages of another are dropped)
        self._analysis: Any = None  # the analysis whose figures were sent to the workers
        self._sent: set[str] = set()
        self._unsupported: set[str] = set()

    def __enter__(self) -> "FigureWriter":
        if self._pool is None and self.processes > 0:
            context = multiprocessing.get_context(_start_method())
            self._queue = context.Queue()
            # Put never waits for the zygote; a queue a dead zygote leaves unread is not waited for at exit.
            self._queue.cancel_join_thread()
            self._pool = ProcessPoolExecutor(1, mp_context=context, initializer=_start_zygote,
                                             initargs=(self._queue,))
            self._start_session()
        return self

    def __exit__(self, exc_type: Any, *_exc: Any) -> None:
        # Waited for after an error too (only a Ctrl-C returns at once): the interpreter's exit joins the
        # pool's thread anyway, and on Python 3.11 its wake-up at exit races that thread's own close of
        # its pipe, a traceback (EBADF) printed after the error message (seen once in CI, disk full).
        self.close(wait=exc_type is None or not issubclass(exc_type, KeyboardInterrupt))

    def _start_session(self) -> None:
        """A new analysis to draw: the zygote forks its workers for it now (once warm)."""
        assert self._pool is not None
        self._session += 1
        self._job = self._pool.submit(_serve, self._session, self.processes, self.formats)
        self._analysis, self._sent, self._unsupported = None, set(), set()

    def _end_session(self) -> None:
        if self._job is not None and not self._job.done():
            self._queue.put(("cancel", self._session))
        self._job = None

    def close(self, wait: bool = True) -> None:
        """Stop the workers; with ``wait``, once they have exited."""
        pool, self._pool = self._pool, None
        if pool is not None:
            self._end_session()
            pool.shutdown(wait=wait, cancel_futures=True)
            self._queue.close()
            if not wait:
                # A spawned zygote may still be starting: it unpickles the queue, whose semaphores go
                # when the queue is collected (a traceback in the zygote). The interpreter's exit
                # waits for the pool's processes before it collects this list.
                _CLOSED_QUEUES.append(self._queue)
        self._analysis = None

    def prepare(self, analysis: Any) -> None:
        """Send each figure of ``analysis`` whose statistics are computed by now to a worker (the dearest
        first, :data:`DRAW_ORDER`). :func:`moeprof.analysis.run.analyze` calls this as it goes."""
        if self.processes == 0 or not self.formats:
            return
        self.__enter__()
        if analysis is not self._analysis:
            if self._job is None or self._analysis is not None:  # another analysis: what was sent is not for it
                self._end_session()
                self._start_session()
            self._analysis = analysis
        for name in DRAW_ORDER:
            if name in self._sent or name in self._unsupported:
                continue
            state = ready(name, analysis)
            if state:
                # Pickled here, so that the zygote passes on bytes it does not read.
                inputs = pickle.dumps(_inputs(name, analysis), protocol=pickle.HIGHEST_PROTOCOL)
                self._queue.put(("draw", self._session, name, inputs))
                self._sent.add(name)
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
        assert self._job is not None
        job, self._job, self._analysis = self._job, None, None
        self._queue.put(("end", self._session, names))
        try:
            drawn = job.result()
        except BaseException:
            # The figures being drawn finish, the others are not started; nothing was written.
            self.close(wait=True)
            raise
        assert drawn is not None
        plots_dir.mkdir(exist_ok=True)
        files = []
        for name in names:
            for file_name, data in drawn[name].items():
                files.append(plots_dir / file_name)
                files[-1].write_bytes(data)
        return files
