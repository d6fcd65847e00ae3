"""The policy comparison as one figure (PNG and SVG): cross-node traffic and GPU load side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_comparison(cmp: dict[str, Any], out_stem: str | Path) -> list[Path]:
    rows = cmp["rows"]
    keys = [r["key"] for r in rows]
    cross = [r["cross_node_bytes_per_token"] / 1024 for r in rows]
    intra = [r["intra_node_bytes_per_token"] / 1024 for r in rows]
    med = [r["gpu_load_max_mean"]["median"] for r in rows]
    p90 = [r["gpu_load_max_mean"]["p90"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    x = range(len(rows))
    a.bar([i - 0.2 for i in x], cross, width=0.4, label="cross-node", color="#c0392b")
    a.bar([i + 0.2 for i in x], intra, width=0.4, label="intra-node", color="#7f8c8d")
    a.set_xticks(list(x), keys, rotation=30, ha="right")
    a.set_ylabel("KiB per token (dispatch + combine)")
    a.set_title("All-to-all traffic, held-out requests")
    a.legend(frameon=False, loc="upper left", ncol=2)
    a.set_ylim(0, max(cross + intra + [1]) * 1.18)
    b.bar(x, med, color="#2c7fb8", label="median")
    b.errorbar(x, med, yerr=[[0] * len(rows), [p - m for p, m in zip(p90, med)]], fmt="none", ecolor="k",
               capsize=4, label="p90")
    eplb = next((r for r in rows if r["key"] == "eplb"), None)
    if eplb:
        ref = 1.1 * eplb["gpu_load_max_mean"]["median"]
        b.axhline(ref, color="#c0392b", ls="--", lw=1, label=f"1.1 × eplb median = {ref:.2f}")
    b.axhline(1.0, color="k", lw=0.5)
    b.set_xticks(list(x), keys, rotation=30, ha="right")
    b.set_ylabel("max / mean GPU load")
    b.set_title(f"GPU load per layer per micro-batch of {rows[0]['batch_size'] if rows else '?'} tokens")
    b.legend(frameon=False, fontsize=8)
    topo = cmp["topology"]
    fig.suptitle(f"{topo['nodes']} nodes × {topo['gpus_per_node']} GPUs × {topo['slots_per_gpu']} slots "
                 f"({topo['num_redundant_experts']} redundant)", fontsize=10)
    return save_png_svg(fig, out_stem)


def save_png_svg(fig: Any, out_stem: str | Path) -> list[Path]:
    """Write ``fig`` as ``out_stem.png`` and ``out_stem.svg``, close it, return the two paths."""
    out_stem = Path(out_stem)
    paths = []
    for ext in ("png", "svg"):
        p = out_stem.with_suffix("." + ext)
        fig.savefig(p, dpi=120)
        paths.append(p)
    plt.close(fig)
    return paths
