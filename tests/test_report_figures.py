"""What the report's findings and figures say: each finding once, a placement headline that weighs
GPU load, findings with a minimum support, and figures that show dead experts, every expert id and a
sane diff axis."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from moeprof.report import build, plots
from moeprof.report.view import Inputs


def _row(key, grouping, cross, load, intra=50_000.0):
    return {"key": key, "policy": key, "grouping": grouping, "cross_node_bytes_per_token": cross,
            "intra_node_bytes_per_token": intra, "local_node_share": 0.5, "local_gpu_share": 0.2,
            "gpu_load_max_mean": {"median": load, "p90": load + 0.2}, "batch_size": 256, "fit_seconds": 0.1,
            "hidden_size": 192, "dtype_bytes": 4}


def _compare(rows):
    return {"rows": rows, "topology": {"nodes": 4, "gpus_per_node": 4, "slots_per_gpu": 4, "num_redundant_experts": 32},
            "split": {"test_requests": 120}, "notes": []}


def test_placement_headline_weighs_gpu_load_and_compares_with_eplb():
    rows = [_row("linear", "random", 120 * 1024, 1.9), _row("eplb", "random", 100 * 1024, 1.25),
            _row("kmeans", "prefill", 40 * 1024, 1.75), _row("locality", "prefill", 60 * 1024, 1.29),
            _row("locality+domain", "domain", 30 * 1024, 1.2)]
    sec = build._placement(Inputs(compare=_compare(rows)))
    assert sec.finding.startswith("Policy locality sends the fewest bytes across nodes among policies with the "
                                  "busiest GPU within 1.1× eplb's")
    assert "60.0 KiB per token, 40.0% less than eplb" in sec.finding
    assert "kmeans sends fewer (40.0 KiB) but its busiest GPU is at 1.75×" in sec.finding
    table = sec.tables[0]
    assert "cross-node KiB/token" in table.columns and "vs eplb" in table.columns
    assert not any("B/token" in c and "KiB" not in c for c in table.columns)
    kmeans = next(r for r in table.rows if r[0] == "kmeans")
    assert kmeans[2] == "40.0" and kmeans[3] == "-60.0%"


def test_placement_headline_when_nothing_beats_eplb_within_the_load_bound():
    rows = [_row("eplb", "random", 100 * 1024, 1.25), _row("kmeans", "prefill", 40 * 1024, 2.5)]
    sec = build._placement(Inputs(compare=_compare(rows)))
    assert sec.finding.startswith("No policy beats eplb on cross-node bytes with its busiest GPU within 1.1× eplb's")


def test_terminal_comparison_and_figure_use_kib_per_token(tmp_path):
    from rich.console import Console

    from moeprof.report.placement import render_comparison
    from moeprof.report.placement_plot import plot_comparison

    cmp = dict(_compare([_row("eplb", "random", 10 * 1024, 1.25), _row("locality", "prefill", 5 * 1024, 1.3)]),
               split={"train_requests": 280, "test_requests": 120, "split_seed": 0})
    con = Console(width=200, record=True)
    render_comparison(cmp, con)
    text = con.export_text()
    assert "KiB/token" in text and "B/token" not in text.replace("KiB/token", "")
    assert re.search(r"locality[\s│]+prefill[\s│]+5\.0[\s│]+-50\.0%", text)
    import matplotlib.pyplot as plt

    seen = {}
    orig = plt.Figure.savefig
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", lambda fig, *a, **k: seen.setdefault("y", fig.axes[0].get_ylabel()) and orig(fig, *a, **k))
        plot_comparison(cmp, tmp_path / "compare")
    assert seen["y"].startswith("KiB per token")


def _coact(pairs):
    return {"coactivation": {"available": True, "pairs": {"top_by_lift": pairs}, "transitions": {"available": False,
                                                                                             "reason": "x"}}}


def test_coactivation_headline_needs_support():
    pairs = [dict(layer=0, expert_a=3, expert_b=9, count=10, lift=151.0),
             dict(layer=1, expert_a=1, expert_b=2, count=400, lift=2.4)]
    sec = build._coactivation(Inputs(summary=_coact(pairs)))
    assert "151" not in sec.finding
    assert "Experts 1 and 2 of layer 1 are chosen together 2.4× as often as chance (400 tokens; pairs seen by at " \
           f"least {build.MIN_PAIR_TOKENS} tokens)" in sec.finding
    few = build._coactivation(Inputs(summary=_coact(pairs[:1])))
    assert "151" not in few.finding and f"No expert pair was chosen by {build.MIN_PAIR_TOKENS} tokens" in few.finding


def test_specialist_table_leaves_out_experts_the_domain_barely_uses():
    summary = {
        "domain_shift": {"available": True, "specialist_lift": 2.0,
                         "pairs": [dict(domain_a="code", domain_b="math", js_mean=0.2, js_max=0.3, jaccard_mean=0.5)],
                         "top_specialists": [dict(domain="code", layer=0, expert=4, lift=9.0, share=0.0001),
                                             dict(domain="math", layer=1, expert=7, lift=3.0, share=0.08)]},
        "classification": {"available": False, "reason": "x"},
    }
    inputs = Inputs(summary=summary)
    import moeprof.report.view as view

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(view, "domain_js_max", lambda _i: [SimpleNamespace(layer=1, value=0.3)])
        sec = build._domain(inputs)
    spec = sec.tables[1]
    assert [r[2] for r in spec.rows] == ["7"]
    assert not any(r[4] == "0.0%" for r in spec.rows)
    assert "at least 0.5% of the domain's load" in spec.caption


def test_each_finding_appears_once_in_the_page():
    from moeprof.report.document import Report, Section
    from moeprof.report.html import render_html

    sections = [Section("a", "Load imbalance", finding="Layer 2 is the most imbalanced: 2.68× the mean."),
                Section("b", "Domain shift", unavailable="one domain")]
    page = render_html(Report(title="t", subtitle="s", sections=sections, inputs=[], generated_at="now",
                              moeprof_version="0", facts=[]))
    assert page.count("Layer 2 is the most imbalanced") == 1
    assert 'href="#a"' in page and "Contents" in page


# -- figures ----------------------------------------------------------------------------------------
@pytest.fixture
def captured(monkeypatch):
    """Keep each figure plots.py saves instead of closing it."""
    figs = {}

    def keep(fig, out, name):
        figs[name] = fig
        return []

    monkeypatch.setattr(plots, "_save", keep)
    yield figs
    import matplotlib.pyplot as plt

    plt.close("all")


def test_heatmap_shows_dead_experts_in_their_own_colour(captured):
    load = np.array([[10, 0, 5, 1], [4, 4, 4, 4]], float)
    plots.load_heatmap(SimpleNamespace(arrays={"layers": [0, 1], "load": load}), Path("."))
    ax = captured["load_heatmap"].axes[0]
    img = ax.images[0]
    data = img.get_array()
    assert bool(np.ma.getmaskarray(data)[0, 1]) and np.ma.getmaskarray(data).sum() == 1
    rgba = img.cmap(np.ma.masked_array([0.0], mask=[True]))[0]
    assert tuple(rgba[:3]) == (0.0, 0.0, 0.0)  # black, not the colour of 1/16× (light blue)
    assert "black ×: no token (1 expert)" in ax.get_xlabel()
    ticks = ax.get_xticks()
    assert np.allclose(ticks, np.round(ticks)), ticks  # integer expert ids


def test_heatmap_sorts_each_layer_when_large(captured):
    rng = np.random.default_rng(0)
    load = rng.integers(0, 1000, size=(58, 256)).astype(float)
    plots.load_heatmap(SimpleNamespace(arrays={"layers": list(range(58)), "load": load}), Path("."))
    ax = captured["load_heatmap"].axes[0]
    data = np.ma.filled(ax.images[0].get_array(), -99)
    assert (np.diff(data, axis=1) <= 1e-9).all()  # busiest first in every layer
    assert "rank" in ax.get_xlabel()


def test_domain_popularity_labels_every_expert(captured):
    E = 32
    counts = np.random.default_rng(1).integers(1, 50, size=(2, 1, E))
    shift = pl.DataFrame({"layer": [0], "js": [0.2]})
    a = SimpleNamespace(tables={"domain_shift": shift},
                        arrays={"domains": ["code", "math"], "layers": [0], "domain_counts": counts})
    plots.domain_popularity(a, Path("."))
    ax = captured["domain_popularity"].axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert sorted(map(int, labels)) == list(range(E))


def _diff_result(a="runs/a", b="runs/b", same=True):
    from moeprof.report.diff import DiffResult, diff_counts

    counts_a = np.array([[30, 10, 5, 5], [12, 12, 13, 13]], float)
    counts_b = counts_a.copy() if same else counts_a[:, ::-1].copy()
    return DiffResult(a=a, b=b, num_experts=4, layers=diff_counts([0, 1], counts_a, counts_b), only_a=[], only_b=[])


def test_diff_axis_starts_at_zero_and_is_not_autoscaled_for_identical_runs():
    from moeprof.report.diff import JS_AXIS_MIN, plot_diff

    r = _diff_result()
    assert all(d.js >= 0 for d in r.layers)
    fig = plot_diff(r)
    ax1, ax2 = fig.axes[:2]
    assert ax1.get_ylim() == (0.0, JS_AXIS_MIN)
    fig.canvas.draw()
    assert not ax1.yaxis.get_major_formatter().get_offset()  # no "1e-6" offset
    line_a, line_b = ax2.get_lines()[:2]
    assert line_a.get_linewidth() > line_b.get_linewidth() and line_a.get_zorder() < line_b.get_zorder()
    assert line_a.get_linestyle() == "-" and line_b.get_linestyle() == "--"  # A shows under B


def test_diff_of_cjk_paths_draws_without_missing_glyphs(tmp_path):
    from moeprof.report.diff import write_diff

    r = _diff_result(a="运行/基线/summary.json", b="运行/新/summary.json", same=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font(s)" is a UserWarning
        files = write_diff(r, tmp_path)
    assert files["png"].stat().st_size > 1000
    import json

    assert json.loads(files["json"].read_text(encoding="utf-8"))["a"].startswith("运行")  # JSON keeps the names
