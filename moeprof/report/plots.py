"""Figures of ``moeprof analyze`` (matplotlib, Agg): each answers one question, saved as PNG and SVG.

- ``load_heatmap``: which experts carry the load, layer by layer?
- ``imbalance_vs_batch``: how much worse is the straggler factor in real batches than over the trace?
- ``domain_js``: how different are domains' expert distributions, per layer?
- ``domain_popularity``: which experts does each domain favour (the layer where domains differ most)?
- ``prefill_decode``: does a request's prefill predict its decode, beyond its domain's average?
- ``transitions``: given a token's expert in one layer, how predictable is its expert in the next?
"""

from __future__ import annotations

import io
import math
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from moeprof.report.figures import FORMATS, supported  # noqa: E402

# svg.fonttype "none": SVG text as text (in DejaVu Sans, or the viewer's sans-serif where it lacks it),
# not as an outline of every glyph: the SVGs cost about 30% less CPU, and their text can be searched.
# text.hinting "none": glyphs drawn as designed, not fitted to the pixel grid by FreeType's autohinter
# (a shade softer at 150 dpi; about 7% of the figures' CPU).
_STYLE = {"font.size": 10, "axes.titlesize": 12, "axes.labelsize": 10, "figure.dpi": 100,
          "figure.autolayout": False, "figure.constrained_layout.use": False, "svg.fonttype": "none",
          "text.hinting": "none"}
PNG_DPI = 150
# zlib level of the PNGs: 3 takes about two thirds of the time of Pillow's default (6); with the alpha
# channel left out of opaque figures the files are within about 15% of matplotlib's (RGBA, level 6).
PNG_COMPRESS_LEVEL = 3
# Heatmaps are drawn with interpolation "none": Agg draws it as "nearest" (as the PNGs were drawn), and
# in the SVG matplotlib embeds the array itself, one pixel a cell, shown with crisp edges, not the array
# resampled to the figure's resolution and PNG-encoded (most of an SVG's CPU and bytes).
HEATMAP_INTERPOLATION = "none"


_formats: ContextVar[tuple[str, ...]] = ContextVar("moeprof_plot_formats", default=FORMATS)
# Set by render(): the files a figure would write, as bytes by file name, kept in memory instead.
_memory: ContextVar[dict[str, bytes] | None] = ContextVar("moeprof_plot_memory", default=None)


# The PNG is drawn on the figure widened by MARGIN_INCHES on every side, so that what reaches beyond the
# figure (tick labels under the axes, a colour bar's label) is drawn too, then cut to what was drawn.
# Where something is drawn within GUARD_INCHES of the canvas's edge, something else may lie beyond it
# (matplotlib sets each label a few points from what it labels): savefig measures and draws it instead.
MARGIN_INCHES = 1.0
GUARD_INCHES = 0.3


def _ink_box(rgba: np.ndarray) -> tuple[int, int, int, int] | None:
    """Where an (H, W, 4) picture differs from its background (its top left pixel): (top, bottom, left,
    right) as slice bounds; None where it is blank."""
    pixels = np.ascontiguousarray(rgba).view(np.uint32)[..., 0]  # one number a pixel
    rows = np.flatnonzero((pixels != pixels[0, 0]).any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero((pixels[rows[0]:rows[-1] + 1] != pixels[0, 0]).any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _png(rgba: np.ndarray, target: Any) -> None:
    """Write an (H, W, 4) uint8 picture as PNG, as matplotlib would (its Software tag, the dpi), less
    the alpha channel where every pixel is opaque."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"Matplotlib version{matplotlib.__version__}, https://matplotlib.org/")
    image = Image.fromarray(np.ascontiguousarray(rgba))
    if image.getchannel("A").getextrema() == (255, 255):
        image = image.convert("RGB")
    image.save(target, format="png", compress_level=PNG_COMPRESS_LEVEL, pnginfo=info, dpi=(PNG_DPI, PNG_DPI))


def _draw(fig: plt.Figure) -> tuple[np.ndarray, Bbox] | None:
    """``fig`` drawn once at PNG_DPI on a canvas widened by MARGIN_INCHES, cut to what was drawn plus
    savefig's padding: the (H, W, 4) picture and its box in inches (figure coordinates, as savefig's
    bbox_inches takes it). None where the drawing comes within GUARD_INCHES of the canvas's edge."""
    buf = io.BytesIO()
    width, height = fig.get_size_inches()
    m = MARGIN_INCHES
    # A whole number of pixels (and a quarter, so that matplotlib's int() gets it), from a whole number
    # of pixels left of and below the figure's origin: what savefig draws when cut to a box of whole
    # pixels is then these pixels.
    w, h = math.ceil((width + 2 * m) * PNG_DPI), math.ceil((height + 2 * m) * PNG_DPI)
    canvas = Bbox.from_extents(-m, -m, (w + 0.25) / PNG_DPI - m, (h + 0.25) / PNG_DPI - m)
    fig.savefig(buf, format="rgba", dpi=PNG_DPI, bbox_inches=canvas)
    if 4 * w * h != buf.getbuffer().nbytes:
        return None
    rgba = np.frombuffer(buf.getbuffer(), np.uint8).reshape(h, w, 4)
    ink = _ink_box(rgba)
    guard = round(GUARD_INCHES * PNG_DPI)
    if ink is None or min(ink[0], ink[2], h - ink[1], w - ink[3]) < guard:
        return None
    pad = round(plt.rcParams["savefig.pad_inches"] * PNG_DPI)
    top, bottom, left, right = ink[0] - pad, ink[1] + pad, ink[2] - pad, ink[3] + pad
    box = Bbox.from_extents(left / PNG_DPI - m, (h - bottom) / PNG_DPI - m, right / PNG_DPI - m, (h - top) / PNG_DPI - m)
    return rgba[top:bottom, left:right], box


def _save(fig: plt.Figure, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.{ext}" for ext in _formats.get()]
    # The figure is drawn once as PNG, on a canvas wide enough for all of it, and cut to what was drawn
    # (with savefig's padding): savefig(bbox_inches="tight") measures the whole figure first (a pass over
    # every artist, every text laid out) and then draws it. The SVG is cut to the same box. A figure
    # drawn beyond the margin, or an SVG alone, is cut by savefig's own measure.
    fig.set_dpi(PNG_DPI)
    fig.set_layout_engine(None)  # None, not "none": no engine at all (_STYLE turns rc's automatic layouts off)
    drawn = _draw(fig) if "png" in _formats.get() else None
    box = drawn[1] if drawn else fig.get_tightbbox().padded(plt.rcParams["savefig.pad_inches"])
    memory = _memory.get()
    for path in paths:
        ext = path.suffix[1:]
        target = io.BytesIO() if memory is not None else path
        if ext == "png" and drawn:
            _png(drawn[0], target)
        else:
            fig.savefig(target, format=ext, dpi=PNG_DPI if ext == "png" else "figure", bbox_inches=box,
                        **({"pil_kwargs": {"compress_level": PNG_COMPRESS_LEVEL}} if ext == "png" else {}))
        if memory is not None:
            memory[path.name] = target.getvalue()
    plt.close(fig)
    return paths


def _layer_ticks(ax: plt.Axes, layers: list[int], axis: str = "y", max_ticks: int = 16) -> None:
    step = max(1, math.ceil(len(layers) / max_ticks))
    idx = list(range(0, len(layers), step))
    (ax.set_yticks if axis == "y" else ax.set_xticks)(idx)
    (ax.set_yticklabels if axis == "y" else ax.set_xticklabels)([str(layers[i]) for i in idx])


# Above this many experts per layer, the heatmap sorts each layer's experts by load: 256 columns in id
# order are noise to the eye, the sorted profile shows how steep the skew is and how many are dead.
SORT_EXPERTS_ABOVE = 64
DEAD_COLOR = "black"


def load_heatmap(analysis: Any, out: Path) -> list[Path]:
    layers = analysis.arrays["layers"]
    load = np.asarray(analysis.arrays["load"], np.float64)  # (L, E)
    E = load.shape[1]
    sort = E > SORT_EXPERTS_ABOVE
    if sort:
        load = -np.sort(-load, axis=1)  # each layer's experts, busiest first
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.log2(load / load.mean(axis=1, keepdims=True))
    # log2 of load / mean, symmetric around 0 (balanced), clipped at 1/16x and 16x. Dead experts (no
    # token) are masked and drawn in their own colour: at the colour floor they would look merely cold.
    dead = load == 0
    live = np.isfinite(rel) & ~dead
    lim = float(min(4.0, max(1.0, np.ceil(np.nanmax(np.abs(rel[live]))) if live.any() else 1.0)))
    rel = np.ma.masked_array(np.clip(np.nan_to_num(rel, nan=0.0, neginf=-lim, posinf=lim), -lim, lim), mask=dead)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad=DEAD_COLOR)
    fig, ax = plt.subplots(figsize=(10, max(3.0, 1.4 + 0.12 * len(layers))))
    im = ax.imshow(rel, aspect="auto", cmap=cmap, vmin=-lim, vmax=lim, interpolation=HEATMAP_INTERPOLATION)
    n_dead = int(dead.sum())
    if sort:
        xlabel = f"expert rank within its layer, busiest first (1-{E}); ids in tables/expert_loads.parquet"
    else:
        xlabel = f"expert id (0-{E - 1})"
    if n_dead:
        xlabel += f"\nblack ×: no token ({n_dead} {'expert' if n_dead == 1 else 'experts'})"
        if not sort and len(layers) <= 64:  # a mark on each dead cell (big enough to see), unlike the coldest blue
            ys, xs = np.nonzero(dead)
            ax.scatter(xs, ys, marker="x", s=24, linewidths=1.2, color="white", zorder=3)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if sort:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{int(v) + 1}"))
    ax.set_ylabel("MoE layer")
    _layer_ticks(ax, layers)
    ax.set_title("Expert load per layer, relative to the layer's mean (red: hot, blue: cold)")
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    ticks = np.arange(-lim, lim + 1)
    cb.set_ticks(ticks)
    cb.set_ticklabels([f"{2.0 ** t:g}×" if t >= 0 else f"1/{2.0 ** -t:g}×" for t in ticks])
    cb.set_label("load / mean load (log scale)")
    return _save(fig, out, "load_heatmap")


def imbalance_vs_batch(analysis: Any, out: Path) -> list[Path]:
    s = analysis.summary
    rows = [b for b in s["batch_imbalance"]["batches"] if b.get("available")]
    B = np.array([r["batch_size"] for r in rows], float)
    med = np.array([r["median"] for r in rows], float)
    p90 = np.array([r["p90"] for r in rows], float)
    med_ci = np.array([r["median_ci"] for r in rows], float)
    p90_ci = np.array([r["p90_ci"] for r in rows], float)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.fill_between(B, med_ci[:, 0], med_ci[:, 1], color="tab:blue", alpha=0.25, label="median, 95% CI")
    ax.plot(B, med, "o-", color="tab:blue", label="median over batches × layers")
    ax.fill_between(B, p90_ci[:, 0], p90_ci[:, 1], color="tab:red", alpha=0.2, label="p90, 95% CI")
    ax.plot(B, p90, "s--", color="tab:red", label="p90")
    whole = s["imbalance"]["mean_max_over_mean"]
    ax.axhline(whole, color="gray", ls=":", label=f"whole trace, mean over layers ({whole:.2f}×)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(B)
    ax.set_xticklabels([f"{int(b):,}" for b in B])
    ax.set_xlabel("batch size B (tokens per forward pass)")
    ax.set_ylabel("straggler factor: max / mean expert load (×)")
    ax.set_ylim(bottom=0)
    ax.set_title("Load imbalance vs batch size (per layer, per batch)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    return _save(fig, out, "imbalance_vs_batch")


def _column(table: Any, name: str) -> np.ndarray:
    """A column of a table: a polars frame, or the dict of arrays a worker gets (figures.figure_inputs)."""
    return np.asarray(table[name])


def _js_matrix(shift: Any, names: list[str], layer: int | None) -> np.ndarray:
    D = len(names)
    m = np.zeros((D, D))
    idx = {n: i for i, n in enumerate(names)}
    rows = slice(None) if layer is None else _column(shift, "layer") == layer
    sums: dict[tuple[int, int], list[float]] = {}
    for a, b, js in zip(_column(shift, "domain_a")[rows], _column(shift, "domain_b")[rows], _column(shift, "js")[rows]):
        sums.setdefault((idx[a], idx[b]), []).append(float(js))
    for (a, b), v in sums.items():
        m[a, b] = m[b, a] = float(np.mean(v))
    return m


def domain_js(analysis: Any, out: Path) -> list[Path]:
    shift = analysis.tables["domain_shift"]
    names = analysis.arrays["domains"]
    layers = analysis.arrays["layers"]
    show = [None] + [layers[i] for i in np.unique(np.linspace(0, len(layers) - 1, min(len(layers), 7)).round().astype(int))]
    rows = math.ceil(len(show) / 4)
    cols = math.ceil(len(show) / rows)
    D = len(names)
    # Laid out in inches, not by tight_layout (a pass over every text): what lies outside the panels
    # (tick labels, the colour bar's) reaches beyond the figure, and _save keeps it.
    side, gap_x, gap_y, top, bar = max(2.0, 0.45 * D + 0.3), 0.2, 0.45, 0.6, 0.2  # gap_y: a panel's title
    width, height = cols * (side + gap_x) + bar, rows * side + (rows - 1) * gap_y + top
    fig = plt.figure(figsize=(width, height))
    vmax = max(0.05, float(_column(shift, "js").max()))
    im = None
    for k, layer in enumerate(show):
        r, c = divmod(k, cols)
        ax = fig.add_axes((c * (side + gap_x) / width, (height - top - (r + 1) * side - r * gap_y) / height,
                           side / width, side / height))
        m = _js_matrix(shift, names, layer)
        im = ax.imshow(m, cmap="magma_r", vmin=0, vmax=vmax, interpolation=HEATMAP_INTERPOLATION)
        ax.set_xticks(range(D))
        ax.set_yticks(range(D))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(names, fontsize=8)
        # Every panel has the same domains in the same order: they are named along the left column and
        # under the lowest panel of each column, as in any grid of small multiples.
        ax.tick_params(labelleft=c == 0, labelbottom=k + cols >= len(show))
        ax.set_title("mean over layers" if layer is None else f"layer {layer}", fontsize=10)
        if D <= 8:  # the matrix is symmetric with a zero diagonal: each pair's value once, below it
            for i in range(D):
                for j in range(i):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] > 0.6 * vmax else "black")
    fig.suptitle("Domain shift: Jensen-Shannon divergence of expert distributions (base 2; 0 = same, 1 = disjoint)",
                 fontsize=11, y=1 - 0.08 / height, va="top")
    cax = fig.add_axes((cols * (side + gap_x) / width, 0, bar / width, (height - top) / height))
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("JS divergence (bits)")
    return _save(fig, out, "domain_js")


def domain_popularity(analysis: Any, out: Path) -> list[Path]:
    shift = analysis.tables["domain_shift"]
    names = analysis.arrays["domains"]
    layers = analysis.arrays["layers"]
    counts = np.asarray(analysis.arrays["domain_counts"], np.float64)  # (D, L, E)
    shift_layers, at = np.unique(_column(shift, "layer"), return_inverse=True)
    mean_js = np.bincount(at, weights=_column(shift, "js")) / np.bincount(at)
    layer = int(shift_layers[np.argmax(mean_js)])  # the first of equals
    li = layers.index(layer)
    c = counts[:, li]
    share = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    order = np.argsort(-c.sum(axis=0), kind="stable")
    E = c.shape[1]
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.45 * len(names)))
    im = ax.imshow(100 * share[:, order], aspect="auto", cmap="viridis", interpolation=HEATMAP_INTERPOLATION)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    # Every column is an expert id out of order, so every one is labelled up to 64 experts; above,
    # every step-th, and the axis says so.
    step = max(1, math.ceil(E / 64))
    ax.set_xticks(range(0, E, step))
    ax.set_xticklabels([str(order[i]) for i in range(0, E, step)], fontsize=7 if E > 32 else 8,
                       rotation=90 if E > 32 else 0)
    ax.set_xlabel("expert id, ordered by overall load (most loaded on the left)"
                  + (f"; every {step}th labelled" if step > 1 else ""))
    ax.set_ylabel("domain")
    ax.set_title(f"Expert popularity per domain, layer {layer} (the layer where domains differ most)")
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    cb.set_label("share of the domain's token-routes (%)")
    return _save(fig, out, "domain_popularity")


def prefill_decode(analysis: Any, out: Path) -> list[Path]:
    df = analysis.tables["prefill_decode"]
    layers = _column(df, "layer").tolist()
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.16 * len(layers) + 4), 4.5))
    series = [
        ("pearson", "own request (Pearson, mean over requests)", "tab:blue", "o-"),
        ("spearman", "own request (Spearman)", "tab:cyan", "o--"),
        ("aggregate_pearson", "aggregate over requests (Pearson)", "black", "-"),
        ("same_domain_pearson", "control: other request, same domain", "tab:orange", "^-"),
        ("other_domain_pearson", "control: request of another domain", "tab:red", "v-"),
    ]
    ms = 4 if len(layers) <= 30 else 0
    for col, label, color, style in series:
        v = _column(df, col).astype(np.float64)
        if np.isfinite(v).any():
            ax.plot(x, v, style, color=color, label=label, markersize=ms)
    ax.set_xlabel("MoE layer")
    _layer_ticks(ax, layers, axis="x", max_ticks=20)
    ax.set_ylabel("correlation of prefill and decode expert counts")
    ax.set_ylim(min(-0.05, float(np.nanmin([_column(df, c).astype(np.float64) for c, *_ in series])) - 0.05), 1.02)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_title("Prefill → decode: does the prompt predict the answer's experts?")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, out, "prefill_decode")


def transitions(analysis: Any, out: Path) -> list[Path]:
    cond = np.asarray(analysis.arrays["transition_cond"], np.float64)  # (E, E)
    l0, l1 = analysis.arrays["transition_pair"]
    conc = analysis.arrays["transition_concentration"]
    k, E = analysis.arrays["top_k"], analysis.arrays["num_experts"]
    # Laid out in inches, not by tight_layout (a pass over every text): the labels outside the axes
    # reach beyond the figure, and _save keeps them; between the panels, the colour bar's labels and
    # the right panel's (about 1.2 in).
    width, height, gap, top = 10.7, 4.85, 1.25, 0.35
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(width, height), gridspec_kw={
        "width_ratios": [1.15, 1], "left": 0, "right": 1, "bottom": 0, "top": 1 - top / height,
        "wspace": gap / ((width - gap) / 2)})
    im = ax.imshow(np.nan_to_num(cond), cmap="viridis", vmin=0, vmax=min(1.0, float(np.nanmax(cond))),
                   interpolation=HEATMAP_INTERPOLATION, aspect="auto")
    ax.set_xlabel(f"expert e' in layer {l1}")
    ax.set_ylabel(f"expert e in layer {l0}")
    ax.set_title(f"P(e' | e): layer {l0} → {l1} (pair most above its baseline)")
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    cb.set_label(f"P(token goes to e' | it went to e); uniform = {k / E:.3f}")
    x = np.arange(len(conc))
    ms = 3 if len(conc) > 30 else 5
    ax2.plot(x, [c[2] for c in conc], "o-", color="tab:purple", markersize=ms,
             label="observed: load-weighted mean of max_e' P(e'|e)")
    ax2.plot(x, [c[3] for c in conc], "s--", color="tab:green", markersize=ms,
             label="if independent of e: next layer's top expert share")
    ax2.axhline(k / E, color="gray", ls=":", label=f"uniform routing (k/E = {k / E:.3f})")
    ax2.set_xlabel("layer pair (layer → next MoE layer)")
    step = max(1, math.ceil(len(conc) / 12))
    ax2.set_xticks(x[::step])
    ax2.set_xticklabels([f"{c[0]}→{c[1]}" for c in conc][::step], rotation=45, ha="right", fontsize=8)
    ax2.set_ylabel("concentration of the next expert (probability)")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("How predictable is the next layer's expert?")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return _save(fig, out, "transitions")


def draw(name: str, analysis: Any, out: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Figure ``name`` (one of :data:`moeprof.report.figures.FIGURES`) of ``analysis`` into the directory
    ``out``, in each of ``formats``."""
    token = _formats.set(tuple(formats))
    try:
        with plt.rc_context(_STYLE):
            return _FIGURES[name](analysis, Path(out))
    finally:
        _formats.reset(token)


def render(name: str, analysis: Any, formats: tuple[str, ...] = FORMATS) -> dict[str, bytes]:
    """Figure ``name`` of ``analysis`` as :func:`draw` would write it, in memory: the bytes of each file
    by its name (``load_heatmap.png``, ...). A worker process draws this way, and the process that
    owns the output directory writes the files."""
    memory: dict[str, bytes] = {}
    token = _memory.set(memory)
    try:
        draw(name, analysis, Path("."), formats)
    finally:
        _memory.reset(token)
    return memory


def warm_up() -> None:
    """Load the fonts and the renderers' first-use state, by drawing a small figure with text in memory:
    a worker does this while the analysis runs, not when its first figure is due."""
    import io

    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(2, 1))
        ax.imshow(np.arange(4.0).reshape(2, 2), cmap="viridis")
        ax.set_title("warm-up 0.12 → ×")
        fig.colorbar(ax.images[0], ax=ax)
        for fmt in FORMATS:
            fig.savefig(io.BytesIO(), format=fmt)
        plt.close(fig)


_FIGURES = {f.__name__: f for f in (load_heatmap, imbalance_vs_batch, domain_js, domain_popularity, prefill_decode,
                                    transitions)}


def analysis_plots(analysis: Any, out: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Every figure the analysis supports, in each of ``formats`` (png, svg), drawn here one after the
    other; a figure whose statistic is unavailable is not drawn. (:class:`moeprof.report.figures.FigureWriter`
    draws them in worker processes.)"""
    out = Path(out)
    names = supported(analysis.summary) if formats else []
    if names:
        out.mkdir(parents=True, exist_ok=True)
    return [p for name in names for p in draw(name, analysis, out, formats)]


def write_plots(analysis: Any, out: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """The figures of an analyze output directory ``out`` (into ``out/plots``): the writer that
    :func:`moeprof.analysis.run.analyze` takes (``functools.partial`` it for other formats)."""
    return analysis_plots(analysis, Path(out) / "plots", formats)
