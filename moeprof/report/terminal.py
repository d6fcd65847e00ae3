"""Rich renderings of library results for the terminal. No computation happens here."""

from __future__ import annotations

from typing import Any

from moeprof.text import format_ranges
from rich.console import Console
from rich.table import Table
from rich.text import Text


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def render_trace_summary(info: dict[str, Any], con: Console) -> None:
    """Print the dictionary of :func:`moeprof.trace.summary.describe`."""
    m = info["model"]
    status = "[green]complete[/]" if info["complete"] else "[yellow]incomplete (capture interrupted)[/]"
    con.print(f"[bold]{info['path']}[/]  trace format {info['format_version']}  source {info['source']}  {status}")
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="dim")
    t.add_column()
    moe = m["moe_layers"]
    t.add_row("model", f"{m['name']} ({m.get('architecture') or '?'})")
    t.add_row(
        "layers",
        f"{m.get('num_layers') or '?'} total, {len(moe)} MoE"
        + (f" ({format_ranges(moe)})" if moe else "")
        + (f", dense: {format_ranges(m['dense_layers'])}" if m.get("dense_layers") else ""),
    )
    t.add_row(
        "experts",
        f"{m['num_experts']} routed, top-{m['top_k']}"
        + (f", {m['num_shared_experts']} shared (not in routing rows)" if m.get("num_shared_experts") else ""),
    )
    if m.get("hidden_size"):
        t.add_row("hidden size", f"{m['hidden_size']} ({m.get('dtype') or '?'})")
    t.add_row("requests", f"{info['requests']}")
    for domain, n in info["requests_per_domain"].items():
        t.add_row("", f"{domain}: {n}")
    tp = info["tokens_per_phase"]
    if tp:
        t.add_row("tokens", ", ".join(f"{k} {v:,}" for k, v in sorted(tp.items())))
    t.add_row("routing rows", f"{info['routing_rows']:,}")
    if info.get("load_token_routes") is not None:
        t.add_row("count rows", f"{info['load_token_routes']:,} token-routes in count tables")
    bpr = info.get("bytes_per_token_layer")
    t.add_row(
        "size on disk",
        f"{human_bytes(info['size_bytes'])} in {info['shards']} files"
        + (f" ({bpr:.2f} B per token-layer)" if bpr else ""),
    )
    for cap, why in info.get("missing", {}).items():
        t.add_row("not available", f"{cap}: {why}")
    for note in info.get("notes", []):
        t.add_row("note", note)
    con.print(t)


def render_check(result: Any, con: Console) -> None:
    """Print a :class:`moeprof.report.rules.CheckResult`: one row per rule, then every failure."""
    t = Table(title=None, show_lines=False)
    for col, justify in (("", "left"), ("rule", "left"), ("worst", "right"), ("limit", "right"), ("from", "left")):
        t.add_column(col, justify=justify)
    for o in result.outcomes:
        limit = " ".join(
            f"{side} {value:g}" for side, value in (("min", o.rule.min), ("max", o.rule.max)) if value is not None
        )
        worst = "-"
        if o.worst is not None:
            v = o.worst.value
            worst = f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
            if o.worst.layer is not None:
                worst += f" (layer {o.worst.layer})"
        t.add_row("[green]ok[/]" if o.ok else "[red]FAIL[/]", o.rule.label(), worst, limit, o.rule.origin)
    con.print(t)
    failures = result.failures
    if not failures:
        con.print(f"All {len(result.outcomes)} rules hold.", highlight=False)
        return
    failed_rules = sum(not o.ok for o in result.outcomes)
    con.print(f"{failed_rules} of {len(result.outcomes)} rules failed:", style="red", highlight=False)
    for f in failures:
        con.print(Text("  " + f.message()))


def render_diff(result: Any, con: Console, *, max_js: float | None = None) -> None:
    """Print a :class:`moeprof.report.diff.DiffResult` as one row per MoE layer."""
    con.print(f"[bold]A[/] {result.a}\n[bold]B[/] {result.b}", highlight=False)
    t = Table()
    for col in ("layer", "JS A→B", "imbalance A", "imbalance B", "change", "hot appeared", "hot vanished"):
        t.add_column(col, justify="left" if col.startswith("hot") else "right")
    for d in result.layers:
        js = f"{d.js:.4f}"
        if max_js is not None and d.js > max_js:
            js = f"[red]{js}[/]"
        t.add_row(
            str(d.layer), js, f"{d.imbalance_a:.2f}×", f"{d.imbalance_b:.2f}×", f"{d.imbalance_change:+.2f}",
            ", ".join(map(str, d.hot_appeared)) or "-", ", ".join(map(str, d.hot_vanished)) or "-",
        )
    con.print(t)
    if result.only_a or result.only_b:
        con.print(f"MoE layers only in A: {result.only_a or '-'}; only in B: {result.only_b or '-'}", highlight=False)
    con.print(result.finding(), highlight=False)
    if max_js is not None:
        over = [d for d in result.layers if d.js > max_js]
        if over:
            con.print(Text(f"{len(over)} {'layer exceeds' if len(over) == 1 else 'layers exceed'} --max-js {max_js:g}: "
                           + ", ".join(f"layer {d.layer} ({d.js:.4f})" for d in over), style="red"))
        else:
            con.print(f"Every layer is within --max-js {max_js:g}.", highlight=False)
