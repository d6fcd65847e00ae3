"""`moeprof diff`: how expert routing changed between two runs (traces or analyze outputs).

Per MoE layer, from the token-route counts ``n_A(l, e)`` and ``n_B(l, e)`` of the two runs:

- JS divergence (base 2, in [0, 1]) between the expert popularity distributions;
- imbalance (max / mean expert load) in A and in B, and its change;
- hot experts (the top 10% by load, as analyze defines them) that appeared in B or vanished from A.

The statistics are analyze's own (:mod:`moeprof.analysis.domain`, :mod:`moeprof.analysis.load`); this
module only lines the two runs up and draws the figure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.errors import UsageError


@dataclass
class LayerDiff:
    layer: int
    js: float
    imbalance_a: float
    imbalance_b: float
    hot_appeared: list[int]
    hot_vanished: list[int]
    token_routes_a: int
    token_routes_b: int

    @property
    def imbalance_change(self) -> float:
        return self.imbalance_b - self.imbalance_a


@dataclass
class DiffResult:
    a: str
    b: str
    num_experts: int
    layers: list[LayerDiff]
    only_a: list[int] = field(default_factory=list)  # MoE layers present in A only
    only_b: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for row, layer in zip(out["layers"], self.layers):
            row["imbalance_change"] = layer.imbalance_change
        return out

    @property
    def worst(self) -> LayerDiff | None:
        return max(self.layers, key=lambda d: d.js) if self.layers else None

    def finding(self) -> str:
        """One sentence: where routing moved most."""
        w = self.worst
        if w is None:
            return "The two runs share no MoE layer."
        biggest = max(self.layers, key=lambda d: abs(d.imbalance_change))
        if abs(biggest.imbalance_change) < 0.005:
            imb = "imbalance is unchanged in every layer"
        else:
            imb = (f"imbalance changed most in layer {biggest.layer}, from {biggest.imbalance_a:.2f}× to "
                   f"{biggest.imbalance_b:.2f}×")
        if w.js == 0:
            return f"Expert popularity is identical in every layer; {imb}."
        return (
            f"Routing moved most in layer {w.layer} (JS divergence {w.js:.3f}; {_n(len(w.hot_appeared), 'hot expert')} "
            f"appeared, {len(w.hot_vanished)} vanished); {imb}."
        )


def diff_counts(layers: list[int], counts_a: np.ndarray, counts_b: np.ndarray) -> list[LayerDiff]:
    """Per-layer differences of two count arrays ``(L, E)`` (token-routes per layer and expert)."""
    from moeprof.analysis.domain import distributions, hot_set, js_divergence
    from moeprof.analysis.load import imbalance

    js = js_divergence(distributions(counts_a), distributions(counts_b))  # (L,)
    imb_a = imbalance(counts_a)["max_over_mean"]
    imb_b = imbalance(counts_b)["max_over_mean"]
    hot_a, hot_b = hot_set(counts_a), hot_set(counts_b)  # (L, E) bool
    out = []
    for i, layer in enumerate(layers):
        out.append(
            LayerDiff(
                layer=int(layer),
                js=max(0.0, float(js[i])),  # rounding leaves -1e-17 for identical runs
                imbalance_a=float(imb_a[i]),
                imbalance_b=float(imb_b[i]),
                hot_appeared=np.flatnonzero(hot_b[i] & ~hot_a[i]).tolist(),
                hot_vanished=np.flatnonzero(hot_a[i] & ~hot_b[i]).tolist(),
                token_routes_a=int(counts_a[i].sum()),
                token_routes_b=int(counts_b[i].sum()),
            )
        )
    return out


def diff(a: Path | str, b: Path | str, engine: Any = "local", address: str | None = None) -> DiffResult:
    """Compare two runs; each is a trace (a directory or a URI), an analyze output directory or its
    summary.json. Traces are analysed on ``engine`` (:mod:`moeprof.analysis.engine`), once for both."""
    from moeprof.analysis.engine import get_engine
    from moeprof.report.view import expert_counts

    engine = get_engine(engine, address) if engine != "local" or address is not None else engine
    layers_a, counts_a, e_a = expert_counts(a, engine=engine)
    layers_b, counts_b, e_b = expert_counts(b, engine=engine)
    if e_a != e_b:
        raise UsageError(
            f"{a} has {e_a} experts per layer and {b} has {e_b}: expert popularity can only be compared "
            "between runs of the same model"
        )
    common = [x for x in layers_a if x in set(layers_b)]
    if not common:
        raise UsageError(f"{a} (MoE layers {layers_a}) and {b} (MoE layers {layers_b}) share no MoE layer")
    ia = [layers_a.index(x) for x in common]
    ib = [layers_b.index(x) for x in common]
    rows = diff_counts(common, counts_a[ia], counts_b[ib])
    return DiffResult(
        a=str(a), b=str(b), num_experts=e_a, layers=rows,
        only_a=[x for x in layers_a if x not in common], only_b=[x for x in layers_b if x not in set(layers_a)],
    )


DIFF_FILES = {"json": "diff.json", "png": "diff.png", "svg": "diff.svg"}


def write_diff(result: DiffResult, out: Path, *, force: bool = False) -> dict[str, Path]:
    """Write ``diff.json`` and the figure (``diff.png``, ``diff.svg``) into ``out``, whole or not at
    all; ``force`` replaces only these files, and only where moeprof wrote them."""
    import json

    from moeprof.outputs import staged_files

    out = Path(out)
    names = DIFF_FILES
    with staged_files(out, list(names.values()), force, kind="diff") as tmp:
        fig = plot_diff(result)
        try:
            fig.savefig(tmp / names["png"], dpi=120)
            fig.savefig(tmp / names["svg"])
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)
        (tmp / names["json"]).write_text(json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")
    return {key: out / name for key, name in names.items()}


def plot_diff(result: DiffResult):
    """Two panels over MoE layers: JS divergence of popularity; imbalance in A and in B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [d.layer for d in result.layers]
    x = np.arange(len(layers))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    js = [d.js for d in result.layers]
    ax1.bar(x, js, color="#2459a8")
    ax1.set_title("How far expert popularity moved")
    ax1.set_ylabel("JS divergence A→B (base 2, 0…1)")
    # From 0, never below, and at least 0.05 tall: near-identical runs look near-identical, not like a
    # 1e-6-offset autoscale that makes rounding noise fill the panel.
    ax1.set_ylim(0, max(JS_AXIS_MIN, 1.15 * max(js, default=0.0)))
    ax1.ticklabel_format(axis="y", useOffset=False, style="plain")
    a_lab, b_lab = _drawable(_short(result.a)), _drawable(_short(result.b))
    # A wide and pale under B, B narrow on top: where the runs agree both stay visible.
    ax2.plot(x, [d.imbalance_a for d in result.layers], "o-", color="#9aa5b1", lw=4.5, ms=9, alpha=0.8,
             zorder=2, label=f"A: {a_lab}")
    ax2.plot(x, [d.imbalance_b for d in result.layers], "s--", color="#c2410c", lw=1.5, ms=4, zorder=3,
             label=f"B: {b_lab}")
    ax2.axhline(1.0, color="#bbb", lw=0.8, ls="--")
    ax2.set_title("Load imbalance")
    ax2.set_ylabel("busiest expert / mean expert (×)")
    ax2.legend(loc="best", fontsize=8)
    step = max(1, len(layers) // 16)
    for ax in (ax1, ax2):
        ax.set_xlabel("MoE layer")
        ax.set_xticks(x[::step], [str(v) for v in layers[::step]])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Routing change: {a_lab} → {b_lab}")
    return fig


JS_AXIS_MIN = 0.05


def _drawable(text: str) -> str:
    """``text`` with the characters the figure's font has no glyph for (CJK path names under DejaVu
    Sans) replaced by "?", so matplotlib draws no empty boxes and warns about no missing glyph."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    font = FT2Font(font_manager.findfont(font_manager.FontProperties()))
    have = font.get_charmap()
    return "".join(c if ord(c) in have or c.isspace() else "?" for c in text)


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1):]
