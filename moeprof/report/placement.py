"""Rich renderings of placements, simulated metrics and policy comparisons. No computation here."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from moeprof.report.terminal import human_bytes


def _load(m: dict[str, Any]) -> str:
    g = m["gpu_load_max_mean"]
    return f"{g['median']:.2f} / {g['p90']:.2f}"


def render_metrics(m: dict[str, Any], con: Console, title: str = "held-out simulation") -> None:
    t = Table(title=title, show_header=False, box=None, pad_edge=False, title_justify="left")
    t.add_column(style="dim")
    t.add_column()
    t.add_row("tokens", f"{m['tokens']:,} {m.get('phase', '')} tokens of {m.get('requests', '?')} requests "
              f"(grouping: {m.get('grouping', '?')})")
    t.add_row("bytes per crossing", f"{m['hidden_size']} × {m['dtype_bytes']} B, dispatch + combine")
    t.add_row("cross-node", f"{human_bytes(m['cross_node_bytes_per_token'])} per token")
    t.add_row("intra-node", f"{human_bytes(m['intra_node_bytes_per_token'])} per token")
    t.add_row("local routes", f"{m['local_node_share']:.1%} on own node, {m['local_gpu_share']:.1%} on own GPU")
    t.add_row("GPU load max/mean", f"{_load(m)} (median / p90 over layers × micro-batches of {m['batch_size']})")
    if m.get("train_gpu_load_max_mean"):
        t.add_row("  on train requests", f"{_load(dict(gpu_load_max_mean=m['train_gpu_load_max_mean']))} "
                  "(the requests it was fitted on)")
    for M, share in m.get("node_limit", {}).items():
        t.add_row(f"span > {M} nodes", f"{share:.1%} of token-layers")
    con.print(t)
    render_capacity([dict(key="", **m)], con, single=True)


def render_placement(placement, written, notes, con: Console) -> None:
    t = placement.topology
    con.print(f"[bold]{placement.policy}[/] placement, grouping [bold]{placement.grouping.kind}[/]: {t.describe()}")
    info = {k: v for k, v in placement.info.items() if not isinstance(v, (list, dict))}
    if info:
        con.print("  " + ", ".join(f"{k} {_fmt(v)}" for k, v in info.items()), style="dim")
    if placement.metrics:
        render_metrics(placement.metrics, con)
    for path in written:
        con.print(f"wrote {path}")
    for n in notes:
        con.print(f"note: {n}", style="yellow")


def render_comparison(cmp: dict[str, Any], con: Console, files: list[str] | None = None) -> None:
    topo, split = cmp["topology"], cmp["split"]
    con.print(
        f"[bold]Policies on held-out requests[/]: {topo['nodes']} nodes × {topo['gpus_per_node']} GPUs × "
        f"{topo['slots_per_gpu']} slots ({topo['num_redundant_experts']} redundant); fitted on "
        f"{split['train_requests']} requests, scored on {split['test_requests']} (seed {split['split_seed']})"
    )
    rows = cmp["rows"]
    base = next((r for r in rows if r["key"] == "eplb"), rows[0] if rows else None)
    t = Table(show_lines=False)
    for col, just in [("policy", "left"), ("grouping", "left"), ("cross-node\nB/token", "right"),
                      ("vs\neplb", "right"), ("intra-node\nB/token", "right"), ("own\nnode", "right"),
                      ("own\nGPU", "right"), ("GPU load\nmax/mean", "right"), ("p90", "right"),
                      ("train\nload", "right"), ("fit\ns", "right")]:
        t.add_column(col, justify=just, no_wrap=True)
    for r in rows:
        rel = r["cross_node_bytes_per_token"] / base["cross_node_bytes_per_token"] - 1 if base and base["cross_node_bytes_per_token"] else 0.0
        g = r["gpu_load_max_mean"]
        t.add_row(r["key"], r["grouping"], f"{r['cross_node_bytes_per_token']:,.0f}", f"{rel:+.1%}",
                  f"{r['intra_node_bytes_per_token']:,.0f}", f"{r['local_node_share']:.1%}",
                  f"{r['local_gpu_share']:.1%}", f"{g['median']:.2f}", f"{g['p90']:.2f}",
                  f"{r['train_gpu_load_max_mean']['median']:.2f}" if r.get("train_gpu_load_max_mean") else "-",
                  f"{r['fit_seconds']:.2f}")
    con.print(t)
    if rows:
        con.print(f"bytes: hidden {rows[0]['hidden_size']} × {rows[0]['dtype_bytes']} B per crossing, dispatch + "
                  f"combine; load over micro-batches of {rows[0]['batch_size']} tokens (median on held-out "
                  "requests; train load: the same on the requests the policy was fitted on)", style="dim")
    if split.get("locality_load_bound"):
        con.print(f"locality's load bound (train, mean over layers): {split['locality_load_bound']:.2f}", style="dim")
    render_capacity(rows, con)
    render_node_limit(rows, con)
    for n in cmp.get("notes", []):
        con.print(f"note: {n}", style="yellow")
    for f in files or []:
        con.print(f"wrote {f}")


def render_capacity(rows: list[dict[str, Any]], con: Console, single: bool = False) -> None:
    """Smallest capacity factor that keeps drops under 1%, and drops at capacity factor 1.25, per batch size."""
    if not rows or not rows[0].get("capacity"):
        return
    sizes = [c["batch_size"] for c in rows[0]["capacity"]]
    t = Table(title="expert capacity: factor needed for < 1% dropped routes (drops at factor 1.25)",
              title_justify="left")
    if not single:
        t.add_column("policy")
    for b in sizes:
        t.add_column(f"batch {b}", justify="right")
    for r in rows:
        cells = []
        for c in r["capacity"]:
            at = next((g for g in c["grid"] if abs(g["capacity_factor"] - 1.25) < 1e-9), c["grid"][0])
            cells.append(f"{c['capacity_factor_for_max_drop']:.2f} ({at['dropped_share']:.1%})")
        t.add_row(*([] if single else [r["key"]]), *cells)
    con.print(t)


def render_node_limit(rows: list[dict[str, Any]], con: Console) -> None:
    if not rows or not rows[0].get("node_limit"):
        return
    ms = list(rows[0]["node_limit"])
    t = Table(title="node-limited routing: token-layers whose experts span more than M nodes", title_justify="left")
    t.add_column("policy")
    for m in ms:
        t.add_column(f"M = {m}", justify="right")
    for r in rows:
        t.add_row(r["key"], *[f"{r['node_limit'][m]:.1%}" for m in ms])
    con.print(t)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
