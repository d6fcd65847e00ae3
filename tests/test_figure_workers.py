"""The figures of ``analyze --out``: drawn in worker processes (report.figures.FigureWriter) they are the
pictures drawn here, pixel for pixel; each one cut to the box savefig("tight") would cut; the data a
figure shows read back from it equals the table it draws; a figure that fails leaves no output."""

from __future__ import annotations

import io
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from PIL import Image

from moeprof.analysis.run import analyze, analyze_trace
from moeprof.report import figures, plots
from report_data import synthetic_trace

E = 80  # above plots.SORT_EXPERTS_ABOVE: the heatmap sorts each layer


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return synthetic_trace(tmp_path_factory.mktemp("figs") / "trace", num_experts=E)


@pytest.fixture(scope="module")
def analysis(trace):
    return analyze_trace(trace, batch_sizes=[1, 8, 64])


@pytest.fixture
def captured(monkeypatch):
    """Each figure plots.py would save, kept open instead."""
    figs = {}
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: figs.setdefault(name, fig) and [])
    yield figs
    import matplotlib.pyplot as plt

    plt.close("all")


def _pixels(path: Path | io.BytesIO) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_every_figure_is_listed_once_with_its_turn_to_be_drawn(analysis):
    assert list(figures.FIGURES) == list(plots._FIGURES)
    assert sorted(figures.DRAW_ORDER) == sorted(figures.FIGURES)
    assert figures.supported(analysis.summary) == list(figures.FIGURES)  # this trace supports all six


def test_workers_draw_the_pictures_drawn_here(analysis, tmp_path):
    """Each worker gets only its figure's part of the analysis (figure_inputs) and draws the same PNG,
    pixel for pixel, as the whole analysis drawn in this process."""
    here = plots.write_plots(analysis, tmp_path / "here")
    with figures.FigureWriter(processes=2) as writer:
        (tmp_path / "there").mkdir()
        there = writer(analysis, tmp_path / "there")
    assert [p.relative_to(tmp_path / "there") for p in there] == [p.relative_to(tmp_path / "here") for p in here]
    assert len(there) == 12
    for a, b in zip(here, there):
        if a.suffix == ".png":
            assert np.array_equal(_pixels(a), _pixels(b)), a.name
        else:
            assert b.read_text(encoding="utf-8").startswith("<?xml") and b.stat().st_size > 1000
    assert not multiprocessing.active_children()


def _unmatched_within_a_pixel(a: np.ndarray, b: np.ndarray) -> float:
    """The share of pixels of ``a`` that no pixel of ``b`` at most one pixel away equals: 0 for the
    same picture with some glyphs a pixel apart."""
    h, w = a.shape[:2]
    padded = np.pad(b, ((1, 1), (1, 1), (0, 0)), mode="edge")
    matched = np.zeros((h, w), bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            matched |= (padded[dy : dy + h, dx : dx + w] == a).all(axis=2)
    return float(1 - matched.mean())


def test_each_png_is_drawn_once_and_cut_to_what_it_draws(analysis, tmp_path, monkeypatch):
    """_save draws each figure once, on a canvas wider than the figure, and cuts the PNG to what was
    drawn plus savefig's padding: the PNG written is that picture, which is what matplotlib itself draws
    when savefig is given the same box (bbox_inches); every side has its white padding and ink right
    inside it. The SVG is cut to the same box."""
    for name in figures.FIGURES:
        plots.draw(name, analysis, tmp_path)
    kept = {}
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: kept.setdefault(name, fig) and [])
    import matplotlib.pyplot as plt

    pad = round(0.1 * plots.PNG_DPI)  # savefig.pad_inches
    for name in figures.FIGURES:
        plots.draw(name, analysis, tmp_path)
        fig = kept[name]
        fig.set_dpi(plots.PNG_DPI)
        with plt.rc_context(plots._STYLE):  # as plots.draw draws
            drawn = plots._draw(fig)
            assert drawn is not None, name  # drawn within the margin: no second drawing
            rgba, box = drawn
            theirs = io.BytesIO()
            fig.savefig(theirs, format="png", dpi=plots.PNG_DPI, bbox_inches=box)
        written = _pixels(tmp_path / f"{name}.png")
        assert np.array_equal(written, rgba[..., :3]), name  # opaque: written as RGB
        # The same picture: where a text's position falls on half a pixel, Agg rounds it against the
        # canvas's edge, so a glyph may lie a pixel apart (domain_js, laid out in inches).
        # matplotlib 3.8 rounds the box to whole pixels one pixel wider or narrower than later releases.
        theirs = _pixels(theirs)[..., :3]
        h, w = min(theirs.shape[0], written.shape[0]), min(theirs.shape[1], written.shape[1])
        assert abs(theirs.shape[0] - written.shape[0]) <= 1 and abs(theirs.shape[1] - written.shape[1]) <= 1, name
        assert _unmatched_within_a_pixel(written[:h, :w], theirs[:h, :w]) < 0.001, name
        ink = (written != 255).any(axis=2)
        assert not ink[:pad].any() and not ink[-pad:].any() and not ink[:, :pad].any() and not ink[:, -pad:].any()
        assert ink[pad].any() and ink[-pad - 1].any() and ink[:, pad].any() and ink[:, -pad - 1].any(), name
        svg = (tmp_path / f"{name}.svg").read_text(encoding="utf-8")
        width_pt = float(svg.split('width="', 1)[1].split("pt", 1)[0])
        assert width_pt == pytest.approx(box.width * 72, abs=0.01), name
    plt.close("all")


def test_a_figure_drawn_beyond_the_margin_is_cut_by_savefig(tmp_path):
    """A figure with something drawn out to _save's margin (here a tick label about 3 inches long, and
    the axis label beyond it) is measured and drawn by savefig: nothing is cut off."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    ax.set_yticks([0, 1], ["a tick label long enough to reach three inches out", "1"])
    ax.set_ylabel("far to the left")
    fig.set_dpi(plots.PNG_DPI)
    assert plots._draw(fig) is None
    token = plots._formats.set(("png", "svg"))
    try:
        path, svg = plots._save(fig, tmp_path, "far")
    finally:
        plots._formats.reset(token)
    assert "far to the left" in svg.read_text(encoding="utf-8")
    plt.close("all")
    picture = _pixels(path)
    assert picture.shape[1] > (2 + 2.5) * plots.PNG_DPI  # the figure, and the labels left of it
    assert (picture[:, :plots.PNG_DPI // 2] != 255).any()  # the axis label is there, at the left


def test_each_figure_is_sent_to_a_worker_as_soon_as_its_statistics_are_computed(trace, tmp_path):
    """analyze calls the writer's prepare() as statistics are done: the heatmap and the domain figures
    go to a worker before co-activation is computed; every figure once; the summary keeps its order."""
    seen = []

    class Recording(figures.FigureWriter):
        def prepare(self, analysis):
            super().prepare(analysis)
            seen.append((set(self._sent), set(analysis.summary)))

    with Recording(processes=1) as writer:
        got = analyze(trace, out=tmp_path / "a", writers=[writer], batch_sizes=[1, 8, 64])
    assert seen[0] == ({"load_heatmap"}, seen[0][1]) and "batch_imbalance" not in seen[0][1]
    early = [jobs for jobs, summary in seen if "coactivation" not in summary]
    assert {"load_heatmap", "domain_js", "domain_popularity"} <= early[-1]
    assert seen[-1][0] == set(figures.FIGURES)
    assert list(got.summary) == ["summary_format", "moeprof_version", "trace", "selection", "notes", "warnings",
                                 "imbalance", "batch_imbalance", "domain_shift", "classification", "prefill_decode",
                                 "coactivation", "outputs"]  # summary.json's order, as before
    assert sorted(p.name for p in (tmp_path / "a" / "plots").iterdir()) == sorted(
        f"{name}.{ext}" for name in figures.FIGURES for ext in ("png", "svg"))


def test_one_writer_draws_analysis_after_analysis(trace, analysis, tmp_path):
    """The workers stay for the next analysis: what was sent for one left half done is not drawn into
    the next, and each gets its own pictures."""
    other = analyze_trace(trace, batch_sizes=[1, 4])  # another imbalance figure
    for name, a in (("here-a", analysis), ("here-b", other)):
        plots.write_plots(a, tmp_path / name)
    with figures.FigureWriter(processes=2) as writer:
        writer.prepare(other)  # sent, then abandoned
        for name, a in (("a", analysis), ("b", other), ("a2", analysis)):
            (tmp_path / name).mkdir()
            writer(a, tmp_path / name)
    for here, there in (("here-a", "a"), ("here-b", "b"), ("here-a", "a2")):
        for path in sorted((tmp_path / here / "plots").glob("*.png")):
            assert np.array_equal(_pixels(path), _pixels(tmp_path / there / "plots" / path.name)), (there, path.name)
    assert not np.array_equal(_pixels(tmp_path / "a" / "plots" / "imbalance_vs_batch.png"),
                              _pixels(tmp_path / "b" / "plots" / "imbalance_vs_batch.png"))
    assert not multiprocessing.active_children()


def test_a_figure_is_ready_once_what_it_draws_is_there(analysis):
    partial = SimpleNamespace(summary={}, tables={}, arrays={})
    assert figures.ready("load_heatmap", partial) is None
    assert figures.ready("prefill_decode", partial) is None
    partial.arrays.update(layers=analysis.arrays["layers"], load=analysis.arrays["load"])
    assert figures.ready("load_heatmap", partial) is True
    partial.summary["domain_shift"] = {"available": False, "reason": "one domain"}
    assert figures.ready("domain_js", partial) is False  # never drawn
    partial.summary["domain_shift"] = analysis.summary["domain_shift"]
    assert figures.ready("domain_js", partial) is None  # supported, its table not there yet
    partial.tables["domain_shift"] = analysis.tables["domain_shift"]
    partial.arrays["domains"] = analysis.arrays["domains"]
    assert figures.ready("domain_js", partial) is True
    assert [n for n in figures.FIGURES if figures.ready(n, analysis)] == list(figures.FIGURES)


# -- the data each figure shows, read back from it --------------------------------------------------------
def test_heatmap_shows_each_layers_loads_over_their_mean_busiest_first(analysis, captured):
    plots.draw("load_heatmap", analysis, Path("."))
    img = captured["load_heatmap"].axes[0].images[0]
    shown = np.ma.filled(img.get_array(), np.nan)
    loads = analysis.tables["expert_loads"].sort("layer", "expert")
    rel = loads["load_over_mean"].to_numpy().reshape(len(analysis.arrays["layers"]), E)
    want = -np.sort(-rel, axis=1)  # each layer busiest first (E > SORT_EXPERTS_ABOVE)
    lim = img.norm.vmax
    with np.errstate(divide="ignore"):
        want = np.where(want > 0, np.clip(np.log2(want), -lim, lim), np.nan)
    np.testing.assert_allclose(shown, want, rtol=1e-12, atol=1e-12)


def test_domain_js_panels_show_the_domain_shift_table(analysis, captured):
    plots.draw("domain_js", analysis, Path("."))
    fig = captured["domain_js"]
    names = analysis.arrays["domains"]
    shift = analysis.tables["domain_shift"]
    panels = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert panels[0].get_title() == "mean over layers"
    for ax in panels:
        title = ax.get_title()
        rows = shift if title == "mean over layers" else shift.filter(pl.col("layer") == int(title.split()[-1]))
        mean = rows.group_by("domain_a", "domain_b").agg(pl.col("js").mean())
        want = np.zeros((len(names), len(names)))
        for a, b, js in mean.iter_rows():
            want[names.index(a), names.index(b)] = want[names.index(b), names.index(a)] = js
        np.testing.assert_allclose(ax.images[0].get_array(), want, rtol=1e-12)
        assert [t.get_text() for t in ax.get_xticklabels()] == names
        # Each pair's value written once, below the diagonal (the matrix is symmetric, its diagonal 0).
        written = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
        assert written == {(i, j): f"{want[i, j]:.2f}" for i in range(len(names)) for j in range(i)}
    assert [ax.get_ylabel() for ax in fig.axes if not ax.get_title()] == ["JS divergence (bits)"]  # the colour bar


def test_domain_js_names_the_domains_along_the_left_column_and_under_each_column(captured):
    """Eight panels (the mean and 7 of 10 layers) in two rows of four: the domains are named once per
    row and once per column, every panel in the same order."""
    names = ["chat", "code", "math"]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    shift = {"layer": np.repeat(np.arange(10), len(pairs)), "domain_a": np.array([a for a, _ in pairs] * 10),
             "domain_b": np.array([b for _, b in pairs] * 10), "js": np.linspace(0.05, 0.4, 10 * len(pairs))}
    analysis = SimpleNamespace(tables={"domain_shift": shift}, arrays={"domains": names, "layers": list(range(10))})
    plots.draw("domain_js", analysis, Path("."))
    panels = [ax for ax in captured["domain_js"].axes if ax.get_title()]
    assert len(panels) == 8
    for k, ax in enumerate(panels):
        assert [t.get_text() for t in ax.get_yticklabels()] == (names if k % 4 == 0 else []), k
        assert [t.get_text() for t in ax.get_xticklabels()] == (names if k >= 4 else []), k
        assert len(ax.texts) == 3  # the three pairs, once each


def test_figures_are_valid_png_and_svg_with_text_as_text_and_heatmaps_one_pixel_a_cell(analysis, tmp_path):
    """Every file is a PNG (RGB, opaque, 150 dpi) or an SVG (well-formed XML) that holds its title as
    text; each heatmap's SVG embeds its array itself, one pixel a cell, drawn with crisp edges."""
    import base64
    import re
    import xml.etree.ElementTree as ET

    files = plots.write_plots(analysis, tmp_path)
    assert len(files) == 12
    layers = analysis.arrays["layers"]
    for path in files:
        if path.suffix == ".png":
            with Image.open(path) as img:
                img.verify()
            with Image.open(path) as img:
                assert img.format == "PNG" and img.mode == "RGB", path.name
                assert round(img.info["dpi"][0]) == plots.PNG_DPI
                assert img.info["Software"].startswith("Matplotlib")
            continue
        text = path.read_text(encoding="utf-8")
        root = ET.fromstring(text)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        words = " ".join("".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text"))
        assert {"load_heatmap": "Expert load per layer", "imbalance_vs_batch": "Load imbalance vs batch size",
                "domain_js": "Jensen-Shannon", "domain_popularity": "Expert popularity per domain",
                "prefill_decode": "Prefill", "transitions": "How predictable"}[path.stem] in words, path.name
        images = re.findall(r'<image xlink:href="data:image/png;base64,\s*([^"]+)"([^>]*)>', text)
        sizes = [Image.open(io.BytesIO(base64.b64decode(data))).size for data, _ in images]
        crisp = [size for size, (_, attrs) in zip(sizes, images) if "image-rendering:pixelated" in attrs]
        want = {"load_heatmap": [(E, len(layers))], "domain_popularity": [(E, len(analysis.arrays["domains"]))],
                "transitions": [(E, E)], "domain_js": [(len(analysis.arrays["domains"]),) * 2] * (1 + min(len(layers), 7))}
        assert crisp == want.get(path.stem, []), path.name


def test_domain_popularity_shows_each_domains_share_in_the_layer_where_domains_differ_most(analysis, captured):
    plots.draw("domain_popularity", analysis, Path("."))
    ax = captured["domain_popularity"].axes[0]
    layer = int(ax.get_title().split("layer ")[1].split()[0])
    shift = analysis.tables["domain_shift"].group_by("layer").agg(pl.col("js").mean()).sort("js", descending=True)
    assert layer == shift["layer"][0]
    table = analysis.tables["domain_experts"].filter(pl.col("layer") == layer)
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert names == analysis.arrays["domains"]
    counts = np.zeros((len(names), E))
    for d, e, n in table.select("domain", "expert", "count").iter_rows():
        counts[names.index(d), e] = n
    order = np.argsort(-counts.sum(axis=0), kind="stable")  # columns: experts by load in this layer
    labelled = [int(t.get_text()) for t in ax.get_xticklabels()]
    assert labelled == [order[int(x)] for x in ax.get_xticks()] and len(labelled) == E // 2  # every 2nd of 80
    want = 100 * counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ax.images[0].get_array(), want[:, order], rtol=1e-12)


def test_transitions_show_the_conditional_matrix_and_the_concentration_per_pair(analysis, captured):
    plots.draw("transitions", analysis, Path("."))
    ax, ax2 = captured["transitions"].axes[:2]
    l0, l1 = analysis.arrays["transition_pair"]
    shown = np.asarray(ax.images[0].get_array())
    top = analysis.tables["transitions_top"].filter((pl.col("layer") == l0) & (pl.col("next_layer") == l1))
    assert top.height > 0
    for e, e2, p in top.select("expert", "next_expert", "p_next_given_expert").iter_rows():
        assert shown[e, e2] == pytest.approx(p, rel=1e-12)
    conc = analysis.arrays["transition_concentration"]
    observed, independent = ax2.get_lines()[:2]
    np.testing.assert_allclose(observed.get_ydata(), [c[2] for c in conc])
    np.testing.assert_allclose(independent.get_ydata(), [c[3] for c in conc])


def test_prefill_decode_lines_are_the_table_columns(analysis, captured):
    plots.draw("prefill_decode", analysis, Path("."))
    ax = captured["prefill_decode"].axes[0]
    df = analysis.tables["prefill_decode"]
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines() if not line.get_label().startswith("_")}
    np.testing.assert_allclose(lines["own request (Pearson, mean over requests)"], df["pearson"].to_numpy())
    np.testing.assert_allclose(lines["control: request of another domain"], df["other_domain_pearson"].to_numpy())


# -- failures --------------------------------------------------------------------------------------------
def test_a_failing_figure_raises_and_leaves_no_output(trace, tmp_path):
    """A worker's error reaches the caller, the other workers are stopped first, and the output
    directory is not written at all (no partial sibling either)."""
    out = tmp_path / "a"

    def broken(a, out_dir):
        bad = SimpleNamespace(summary=a.summary, tables=a.tables, arrays={**a.arrays, "load": "not an array"})
        return writer(bad, out_dir)

    with pytest.raises(ValueError):
        with figures.FigureWriter(processes=2) as writer:
            analyze(trace, out=out, writers=[broken], batch_sizes=[1, 8])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert not multiprocessing.active_children()


def test_an_error_stops_the_workers_before_it_reaches_the_caller(trace, tmp_path):
    """An error in the analysis (here: its output cannot be written) stops the pool before the caller
    sees it: nothing of the pool is left for the interpreter's exit, whose wake-up of the pool's thread
    races that thread's close of its pipe on Python 3.11 (a traceback after the error message)."""
    import threading
    from concurrent.futures.process import _ExecutorManagerThread

    from moeprof.errors import OutputError

    def unwritable(a, out_dir):
        raise OSError(27, "File too large")

    with pytest.raises(OutputError, match="writing failed"):
        with figures.FigureWriter(processes=1) as writer:
            analyze(trace, out=tmp_path / "a", writers=[writer, unwritable], batch_sizes=[1, 8])
    assert not [t for t in threading.enumerate() if isinstance(t, _ExecutorManagerThread)]
    assert not multiprocessing.active_children()


class _KillsItsWorker:
    """Unpickled in a worker, ends it at once (as a crash or the OOM killer would)."""

    def __reduce__(self):
        import os

        return (os._exit, (3,))


def test_a_worker_that_dies_is_an_error_not_a_hang(trace, tmp_path):
    from concurrent.futures.process import BrokenProcessPool

    out = tmp_path / "a"

    def killing(a, out_dir):
        bad = SimpleNamespace(summary=a.summary, tables=a.tables, arrays={**a.arrays, "load": _KillsItsWorker()})
        return writer(bad, out_dir)

    with pytest.raises(BrokenProcessPool):
        with figures.FigureWriter(processes=2) as writer:
            analyze(trace, out=out, writers=[killing], batch_sizes=[1, 8])
    assert list(tmp_path.iterdir()) == []
    assert not multiprocessing.active_children()


def _record(path: str, value):
    """Unpickled in a worker: note which process it is, and its parent, then give ``value``."""
    import os

    with open(path, "a", encoding="ascii") as f:
        f.write(f"{os.getpid()} {os.getppid()}\n")
    return value


def _kill_parent(path: str, value):
    """Unpickled in a worker: note it, then kill the process that forked it (the zygote), as the OOM
    killer would."""
    import os
    import signal

    _record(path, value)
    os.kill(os.getppid(), signal.SIGKILL)
    return value


class _Unpickled:
    """``fn(path, value)`` where it is unpickled."""

    def __init__(self, fn, path: Path, value):
        self.fn, self.path, self.value = fn, str(path), value

    def __reduce__(self):
        return (self.fn, (self.path, self.value))


def _with_load(a, load):
    return SimpleNamespace(summary=a.summary, tables=a.tables, arrays={**a.arrays, "load": load})


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie that its new parent has not reaped yet counts)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_workers_are_forked_by_one_process_that_imported_matplotlib(analysis, tmp_path):
    """This process starts one worker, the zygote, which imports matplotlib once and forks the workers
    that draw: a figure's inputs are unpickled in a worker whose parent is the zygote (not here, not in
    the zygote), and this process has one child while they draw."""
    import os

    notes = tmp_path / "notes"
    with figures.FigureWriter(processes=2) as writer:
        (tmp_path / "a").mkdir()
        files = writer(_with_load(analysis, _Unpickled(_record, notes, analysis.arrays["load"])), tmp_path / "a")
        children = multiprocessing.active_children()
    assert len(files) == 12
    (worker, parent), = [map(int, line.split()) for line in notes.read_text(encoding="ascii").splitlines()]
    assert [c.pid for c in children] == [parent] and worker not in (os.getpid(), parent)
    assert not multiprocessing.active_children()


def test_a_zygote_that_dies_is_an_error_not_a_hang(analysis, tmp_path):
    """The zygote killed while its workers draw: the writer raises (its workers, left without their
    parent, exit: they hold the pipe that tells this process the zygote is gone), and no process stays."""
    from concurrent.futures.process import BrokenProcessPool

    notes = tmp_path / "notes"
    with pytest.raises(BrokenProcessPool):
        with figures.FigureWriter(processes=2) as writer:
            (tmp_path / "a").mkdir()
            writer(_with_load(analysis, _Unpickled(_kill_parent, notes, analysis.arrays["load"])), tmp_path / "a")
    assert list((tmp_path / "a").iterdir()) == []
    assert not multiprocessing.active_children()
    (worker, _zygote), = [map(int, line.split()) for line in notes.read_text(encoding="ascii").splitlines()]
    assert _gone(worker)  # before the writer could see the zygote exit


@pytest.mark.parametrize("cpus, load, method, workers", [
    (2, 5.5, "spawn", 0), (2, 1.6, "spawn", 0), (2, 1.2, "spawn", 2), (2, 0.0, "spawn", 2), (16, 0.5, "spawn", 3),
    (16, 14.7, "spawn", 2), (16, 14.5, "spawn", 3), (1, 0.0, "spawn", 1),
    (2, 5.5, "fork", 2), (2, 1.6, "fork", 2), (2, 1.2, "fork", 2), (16, 0.5, "fork", 3), (16, 15.0, "fork", 2),
    (1, 3.0, "fork", 1), (1, 0.0, "fork", 1)])
def test_workers_only_where_the_machine_has_idle_cores(monkeypatch, cpus, load, method, workers):
    """One more than the idle cores (rounded), at most three; a forked zygote at least two where there
    are two cores (it imports matplotlib in place of this process, and forks the second); on busy cores
    (less than half a core idle) no spawned one (its imports cost more CPU than drawing here saves)."""
    monkeypatch.setattr(figures.os, "sched_getaffinity", lambda _pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(figures.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(figures, "_running_tasks", lambda: None)  # the load average alone
    monkeypatch.setattr(figures, "_start_method", lambda: method)
    assert figures._workers(method) == workers
    assert figures.FigureWriter().processes == workers


@pytest.mark.parametrize("load, running, busy", [(2.2, 1, 0.0), (2.2, 2, 1.0), (2.2, 5, 2.2), (0.3, 3, 0.3),
                                                 (1.4, None, 1.4)])
def test_cores_busy_are_the_load_average_unless_fewer_tasks_run_now(monkeypatch, load, running, busy):
    """The load average counts this program's own last minute (analyze run on trace after trace):
    no more cores are busy than tasks other than this one run now."""
    monkeypatch.setattr(figures.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(figures, "_running_tasks", lambda: running)
    assert figures._busy_cores() == pytest.approx(busy)


def test_running_tasks_are_read_from_proc_loadavg():
    running = figures._running_tasks()
    if not Path("/proc/loadavg").exists():
        assert running is None
    else:
        assert running >= 1  # this test runs


def test_workers_are_forked_only_from_a_process_of_one_thread(monkeypatch):
    """A fork copies the calling thread alone, and with it any lock another thread holds (polars'
    threads start when it is imported): a process with a second thread spawns its workers."""
    assert figures._start_method() == "spawn"  # pytest's process has imported polars: its threads run
    monkeypatch.setattr(figures.os, "listdir", lambda path: ["1"] if path == "/proc/self/task" else [])
    monkeypatch.setattr(figures.threading, "active_count", lambda: 1)
    assert figures._start_method() == "fork"
    monkeypatch.setattr(figures.threading, "active_count", lambda: 2)  # a Python thread counts too
    assert figures._start_method() == "spawn"


def test_the_command_line_forks_its_workers_before_polars_is_imported(tmp_path):
    """`moeprof analyze --out` starts its workers while it runs one thread: the zygote is forked, and
    forks in turn the workers that draw (each figure drawn in a process whose parent is the zygote),
    which draw the same figures as this process."""
    import subprocess
    import sys

    trace = synthetic_trace(tmp_path / "trace", num_experts=8)
    code = (
        "import os, sys\n"
        "from moeprof.report import figures\n"
        "methods = []\n"
        "start = figures._start_method\n"
        "figures._start_method = lambda: methods.append(start()) or methods[-1]\n"
        "figures._workers = lambda method: 2\n"
        "render, notes = figures._render, sys.argv[3]\n"
        "def noted(*args):\n"
        "    with open(notes, 'a') as f:\n"
        "        f.write(f'{os.getpid()} {os.getppid()} {os.environ.get(\"OPENBLAS_NUM_THREADS\")}\\n')\n"
        "    return render(*args)\n"
        "figures._render = noted\n"
        "print(f'command line pid={os.getpid()}.', file=sys.stderr)\n"
        "from moeprof.commands.main import main\n"
        "sys.argv = ['moeprof', 'analyze', sys.argv[1], '--out', sys.argv[2], '--json']\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    print('methods', methods, file=sys.stderr)\n"
    )
    notes = tmp_path / "notes"
    done = subprocess.run([sys.executable, "-c", code, str(trace), str(tmp_path / "a"), str(notes)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "methods ['fork', 'fork']" in done.stderr
    cli = int(done.stderr.split("command line pid=", 1)[1].split(".", 1)[0])
    drawers = [(int(pid), int(parent), blas) for pid, parent, blas in
               (line.split() for line in notes.read_text(encoding="ascii").splitlines())]
    zygotes = {parent for _pid, parent, _blas in drawers}
    assert len(drawers) == len(figures.supported(analyze_trace(trace).summary))
    assert len(zygotes) == 1 and cli not in zygotes and not {pid for pid, *_ in drawers} & zygotes
    assert {blas for *_, blas in drawers} == {"1"}  # numpy started no BLAS threads in the zygote, which forked
    drawn = sorted(p.name for p in (tmp_path / "a" / "plots").iterdir())
    assert len(drawn) == 2 * len(figures.supported(analyze_trace(trace).summary)) and drawn[0].endswith(".png")
    here = plots.write_plots(analyze_trace(trace), tmp_path / "here")
    for path in here:
        if path.suffix == ".png":
            assert np.array_equal(_pixels(path), _pixels(tmp_path / "a" / "plots" / path.name)), path.name


def test_no_worker_draws_here(analysis, tmp_path):
    with figures.FigureWriter(processes=0) as writer:
        files = writer(analysis, tmp_path)
    assert len(files) == 12 and all(p.parent == tmp_path / "plots" for p in files)
    assert not multiprocessing.active_children()
