"""``simulate --timeline``: the schedules table, the verdict, the traffic matrix (rich), and the figures
(matplotlib, Agg): load and traffic over time with the rebalance points marked, and the traffic
heatmaps. No computation beyond unit changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from moeprof.report.terminal import human_bytes  # noqa: E402

MAX_MATRIX_RANKS = 16  # wider matrices go to the CSV and the heatmap only


def render_timeline(d: dict[str, Any], con: Console, files: list[str] | None = None) -> None:
    topo, hw, ex = d["topology"], d["hardware"], d["expert"]
    con.print(
        f"[bold]Timeline[/]: {d['passes']:,} decode passes, {d['tokens']:,} tokens, {d['moe_layers']} MoE layers on "
        f"{topo['nodes']} nodes × {topo['gpus_per_node']} GPUs × {topo['slots_per_gpu']} slots; {hw['name']}"
    )
    con.print(f"time order: {d['time_order']}", style="dim")
    con.print(f"expert: hidden {ex['hidden']} × moe intermediate {ex['inter']}, {ex['weight_bytes']}-byte weights = "
              f"{human_bytes(ex['expert_bytes'])} per expert; {ex['act_bytes']}-byte activations", style="dim")
    t = Table(title=f"predicted MoE time per decode step (all {d['moe_layers']} MoE layers, migrations at their "
                    "steady-state rate, a one-time migration shown apart) and per MoE layer (without migrations)",
              title_justify="left")
    for col in ("policy · schedule", "µs/step", "µs per\nlayer", "vs\ndefault", "comm\nshare", "busiest\nmax/mean",
                "cross-node\nB/token", "weights\nmoved", "migration\nper step"):
        t.add_column(col, justify="left" if col.startswith("policy") else "right", no_wrap=True,
                     min_width=13 if col.startswith("migration") else None)
    for r in d["rows"]:
        v = r["vs_default"]
        moved = human_bytes(r["migration_bytes"]) + (f" ({r['rebalances']}×)" if r["rebalances"] > 1 else "")
        t.add_row(r["key"], f"{r['us_per_step']:.4g}", f"{r['moe_layer_us']:.4g}", f"{v['step_time']:+.1%}",
                  f"{r['comm_share']:.1%}", f"{r['load_max_mean']:.2f}", f"{r['cross_node_bytes_per_token']:,.0f}",
                  moved, _migration(r),
                  style="bold" if r["key"] == d["best"] else None)
    con.print(t)
    render_windows(d, con)
    render_matrix(d, con)
    con.print(f"[bold]verdict[/]: {d['verdict']}")
    for n in d.get("notes", []):
        con.print(f"note: {n}", style="yellow")
    for f in files or []:
        con.print(f"wrote {f}")


def _migration(r: dict[str, Any]) -> str:
    if r.get("migration_one_time_s"):
        return f"once {human_seconds(r['migration_one_time_s'])}"
    return human_seconds(r["migration_us_per_step"] * 1e-6) if r["migration_us_per_step"] else "-"


def human_seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def render_windows(d: dict[str, Any], con: Console) -> None:
    """Per window: the default's and the winner's (or runner-up's) busiest GPU, cross-node bytes, step time."""
    base = d["rows"][0]
    other = min(d["rows"][1:], key=lambda r: r["us_per_step"], default=None)
    if other is None:
        return
    t = Table(title=f"per window of {d['report_every']} passes: {base['key']} → {other['key']} (step time without "
                    "migration)", title_justify="left")
    for col in ("passes", "busiest GPU\n(routes/layer)", "cross-node\nbytes", "µs/step", "weights\nmoved"):
        t.add_column(col, justify="right", no_wrap=True)
    for a, b in zip(base["windows"], other["windows"]):
        t.add_row(f"{a['start']}-{a['end'] - 1}", f"{a['busiest_load']:.2f} → {b['busiest_load']:.2f}",
                  f"{human_bytes(a['cross_node_bytes'])} → {human_bytes(b['cross_node_bytes'])}",
                  f"{a['moe_us_per_step']:.4g} → {b['moe_us_per_step']:.4g}",
                  human_bytes(b["migration_bytes"]) if b["migration_bytes"] else "")
    con.print(t)


def render_matrix(d: dict[str, Any], con: Console) -> None:
    for key, m in d["traffic_matrices"].items():
        m = np.asarray(m)
        n = m.shape[0]
        if n > MAX_MATRIX_RANKS:
            con.print(f"traffic matrix of {key}: {n} × {n} ranks, in traffic-*.csv and the heatmap", style="dim")
            continue
        t = Table(title=f"traffic matrix, {key}: bytes per token from rank (row) to rank (column), dispatch + combine",
                  title_justify="left")
        t.add_column("rank", justify="right")
        for j in range(n):
            t.add_column(str(j), justify="right")
        for i in range(n):
            t.add_row(str(i), *[f"{x:,.0f}" if x else "·" for x in m[i]])
        con.print(t)


def write_matrix_csv(d: dict[str, Any], out_dir: Path) -> list[Path]:
    paths = []
    for i, (key, m) in enumerate(d["traffic_matrices"].items()):
        p = out_dir / ("traffic-default.csv" if i == 0 else "traffic-best.csv")
        m = np.asarray(m)
        lines = [f"# {key}: bytes per token, rank (row) to rank (column), dispatch + combine",
                 "rank," + ",".join(map(str, range(m.shape[0])))]
        lines += [f"{r}," + ",".join(f"{x:.3f}" for x in row) for r, row in enumerate(m)]
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(p)
        paths.append(p)
    return paths


def plot_timeline(d: dict[str, Any], out_stem: str | Path) -> list[Path]:
    """Busiest GPU, cross-node traffic and predicted step time per window for the default and the
    winner (the runner-up when the default wins); its rebalance points as dotted lines."""
    rows = d["rows"]
    # the winner, or the closest alternative when the default wins
    best = min(rows[1:], key=lambda r: r["us_per_step"], default=rows[0])
    shown = [rows[0]] + ([best] if best is not rows[0] else [])
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True, constrained_layout=True)
    colors = ["#7f8c8d", "#c0392b"]
    for r, c in zip(shown, colors):
        mid = [(w["start"] + w["end"]) / 2 for w in r["windows"]]
        axes[0].plot(mid, [w["load_max_mean"] for w in r["windows"]], marker="o", ms=3, color=c, label=r["key"])
        axes[1].plot(mid, [w["cross_node_bytes_per_token"] / 1024 for w in r["windows"]], marker="o", ms=3, color=c)
        axes[2].plot(mid, [w["moe_us_per_step"] for w in r["windows"]], marker="o", ms=3, color=c)
    for p in best["rebalance_points"]:
        for ax in axes:
            ax.axvline(p["at_pass"], color="#c0392b", lw=0.6, ls=":", alpha=0.8)
    axes[0].axhline(1.0, color="k", lw=0.5)
    axes[0].set_ylabel("busiest GPU\nmax / mean load")
    axes[0].legend(frameon=False, fontsize=8, loc="upper right")
    axes[1].set_ylabel("cross-node KiB\nper token")
    axes[2].set_ylabel("predicted MoE µs\nper decode step")
    axes[2].set_xlabel(f"decode pass (dotted: rebalances of {best['key']}; step time excludes migration)")
    topo = d["topology"]
    fig.suptitle(f"{d.get('model') or 'trace'} on {topo['nodes']} nodes × {topo['gpus_per_node']} GPUs: "
                 f"load and traffic over time", fontsize=10)
    return _save(fig, out_stem)


def plot_traffic(d: dict[str, Any], out_stem: str | Path) -> list[Path]:
    mats = list(d["traffic_matrices"].items())
    fig, axes = plt.subplots(1, len(mats), figsize=(5.2 * len(mats), 4.6), constrained_layout=True, squeeze=False)
    vmax = max(float(np.max(m)) for _, m in mats) or 1.0
    gpn = d["topology"]["gpus_per_node"]
    for ax, (key, m) in zip(axes[0], mats):
        m = np.asarray(m)
        im = ax.imshow(m, cmap="magma_r", vmin=0, vmax=vmax)
        for b in range(gpn, m.shape[0], gpn):  # node boundaries
            ax.axhline(b - 0.5, color="#2c7fb8", lw=0.8)
            ax.axvline(b - 0.5, color="#2c7fb8", lw=0.8)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("to rank")
        ax.set_ylabel("from rank")
    fig.colorbar(im, ax=axes[0].tolist(), label="bytes per token (dispatch + combine)")
    return _save(fig, out_stem)


def _save(fig, out_stem: str | Path) -> list[Path]:
    from moeprof.report.placement_plot import save_png_svg

    return save_png_svg(fig, out_stem)
