"""Rich tables of an ``analyze`` summary for the terminal. Renders the summary dict; computes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

MAX_LAYER_ROWS = 12


def _f(x: Any, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(point: Any, ci: list[Any] | None, digits: int = 2) -> str:
    if point is None:
        return "-"
    if not ci or ci[0] is None:
        return _f(point, digits)
    return f"{point:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _show(con: Console, title: str, tab: Table, caption: str | None = None) -> None:
    """Title, table, caption on their own lines: a narrow table never wraps its title."""
    con.print(f"[bold]{title}[/]")
    con.print(tab)
    if caption:
        con.print(f"[dim]{caption}[/]")
    con.print()


def _unavailable(con: Console, title: str, section: dict[str, Any]) -> bool:
    if section.get("available"):
        return False
    con.print(f"[bold]{title}[/]: [yellow]not available[/]: {section.get('reason', '')}")
    return True


def render_analysis(s: dict[str, Any], con: Console, out: Path | None = None) -> None:
    t = s["trace"]
    m = t["model"]
    con.print(
        f"[bold]{t['path']}[/]  {m['name']}: {len(m['moe_layers'])} MoE layers, {m['num_experts']} experts, "
        f"top-{m['top_k']}  ·  {t['rows_analyzed']:,} routing rows, {t['tokens']:,} tokens, {t['requests']:,} requests"
        + ("" if t["per_token"] else "  ·  [yellow]count tables only[/]")
    )
    if t["requests_per_domain"]:
        con.print("domains: " + ", ".join(f"{d} {n}" for d, n in t["requests_per_domain"].items()))
    for note in s.get("notes", []):
        con.print(f"[dim]note: {note}[/]")
    _imbalance(s["imbalance"], con)
    _batches(s["batch_imbalance"], con)
    _domain(s["domain_shift"], s["classification"], con)
    _phase(s["prefill_decode"], con)
    _coactivation(s["coactivation"], con)
    if out is not None:
        plots = [o.rsplit(".", 1)[-1] for o in s.get("outputs", []) if o.startswith("plots/")]
        kinds = "|".join(k for k in ("png", "svg") if k in plots)  # none with --figures none
        con.print(f"\nwrote {out}/summary.json, {out}/tables/*.parquet" + (f", {out}/plots/*.{kinds}" if kinds else ""))


def _imbalance(imb: dict[str, Any], con: Console) -> None:
    rows = imb["per_layer"]
    shown = rows
    title = "Load imbalance per layer (whole trace)"
    if len(rows) > MAX_LAYER_ROWS:
        shown = sorted(rows, key=lambda r: -(r["max_over_mean"] or 0))[:MAX_LAYER_ROWS]
        shown.sort(key=lambda r: r["layer"])
        title += f": the {MAX_LAYER_ROWS} most imbalanced of {len(rows)} layers"
    tab = Table()
    for col in ("layer", "tokens", "max/mean", "CV", "Gini", "entropy", "dead", "top-10% share"):
        tab.add_column(col, justify="right")
    phase = "prefill_max_over_mean" in rows[0]
    if phase:
        tab.add_column("prefill max/mean", justify="right")
        tab.add_column("decode max/mean", justify="right")
    for r in shown:
        cells = [str(r["layer"]), f"{r['tokens']:,}", _f(r["max_over_mean"]), _f(r["cv"]), _f(r["gini"]),
                 _f(r["entropy"]), str(r["dead"]), _f(100 * r["hot_share"], 1) + "%" if r["hot_share"] is not None else "-"]
        if phase:
            cells += [_f(r["prefill_max_over_mean"]), _f(r["decode_max_over_mean"])]
        tab.add_row(*cells)
    caption = (
        f"mean over layers: max/mean {_f(imb['mean_max_over_mean'])}, CV {_f(imb['mean_cv'])}, "
        f"Gini {_f(imb['mean_gini'])}; worst layer {imb['worst_layer']['layer']} "
        f"({_f(imb['worst_layer']['max_over_mean'])}); dead experts {imb['dead_experts']}"
    )
    _show(con, title, tab, caption)


def _batches(b: dict[str, Any], con: Console) -> None:
    if _unavailable(con, "Imbalance over batches", b):
        w = b.get("source_windows")
        if w:
            con.print(f"  over the source's own {w['windows']} count windows: median max/mean "
                      f"{_ci(w['median'], w['median_ci'])}, p90 {_ci(w['p90'], w['p90_ci'])}")
        return
    tab = Table()
    for col in ("B", "batches", "median [95% CI]", "p90 [95% CI]"):
        tab.add_column(col, justify="right")
    for r in b["batches"]:
        if not r["available"]:
            tab.add_row(f"{r['batch_size']:,}", "0", f"[yellow]not available[/]: {r['reason']}", "")
            continue
        tab.add_row(f"{r['batch_size']:,}", str(r["batches"]), _ci(r["median"], r["median_ci"]), _ci(r["p90"], r["p90_ci"]))
    caption = b["method"] + ("" if b["whole_trace"] else f"; sample of {b['sample_tokens']:,} tokens")
    _show(con, "Imbalance over batches of B tokens (max/mean per layer per batch)", tab, caption)


def _domain(d: dict[str, Any], c: dict[str, Any], con: Console) -> None:
    if not _unavailable(con, "Domain shift", d):
        tab = Table()
        for col in ("domain A", "domain B", "JS mean", "JS max", "Jaccard mean"):
            tab.add_column(col, justify="right" if col.startswith(("JS", "Jac")) else "left")
        for r in d["pairs"]:
            tab.add_row(r["domain_a"], r["domain_b"], _f(r["js_mean"], 3), _f(r["js_max"], 3), _f(r["jaccard_mean"]))
        caption = "specialist experts (lift > 2), per domain over all layers: " + ", ".join(
            f"{k} {v}" for k, v in d["specialists_per_domain"].items()
        )
        _show(con, "Domain shift (JS divergence base 2; Jaccard of top-10% hot experts)", tab, caption)
    if not _unavailable(con, "Domain classification from prefill", c):
        per = ", ".join(f"{k} {100 * v:.0f}%" for k, v in c["per_domain"].items())
        con.print(
            f"[bold]Domain from prefill counts[/]: accuracy [bold]{100 * c['accuracy']:.1f}%[/] on "
            f"{c['test_requests']} held-out requests (chance {100 * (c['chance'] or 0):.0f}%); {per}"
            + _request_sample(c)
        )
        con.print()


def _phase(p: dict[str, Any], con: Console) -> None:
    if _unavailable(con, "Prefill → decode correlation", p):
        return
    tab = Table()
    tab.add_column("decode vector of", justify="left")
    tab.add_column("Pearson", justify="right")
    tab.add_column("Spearman", justify="right")
    tab.add_row("the same request", _f(p["pearson"]), _f(p["spearman"]))
    for key, label in (("same_domain", "another request, same domain"), ("other_domain", "a request of another domain")):
        ctl = p["controls"][key]
        if ctl["available"]:
            tab.add_row(label, _f(ctl["pearson"]), _f(ctl["spearman"]))
        else:
            tab.add_row(label, "[yellow]n/a[/]", f"[yellow]{ctl['reason']}[/]")
    tab.add_row("all requests summed (aggregate)", _f(p["aggregate_pearson"]), _f(p["aggregate_spearman"]))
    caption = "recall of decode's top-m among prefill's top-m: " + ", ".join(
        f"m={k[3:]} {_f(v)}" for k, v in p["recall"].items()
    )
    _show(con, f"Prefill → decode correlation ({p['requests']:,} requests; mean over layers)", tab,
          caption + _request_sample(p))


def _request_sample(s: dict[str, Any]) -> str:
    """`` (a sample of N of the trace's M requests)`` when a per-request statistic saw a sample."""
    if s.get("whole_trace", True):
        return ""
    return f"; a seeded sample of {s['requests']:,} of the trace's {s['requests_in_trace']:,} requests (--sample-requests)"


def _coactivation(c: dict[str, Any], con: Console) -> None:
    if _unavailable(con, "Co-activation", c):
        return
    scope = "every token" if c["whole_trace"] else f"a seeded sample of {c['tokens']:,} tokens"
    con.print(f"[bold]Co-activation[/] over {scope}:")
    pairs = c["pairs"]
    if pairs["top_by_lift"]:
        top = pairs["top_by_lift"][:5]
        con.print("  most over-represented expert pairs within a layer (lift = P(a,b) / P(a)P(b)): "
                  + ", ".join(f"L{r['layer']} {r['expert_a']}+{r['expert_b']} ×{r['lift']:.2f}" for r in top))
    t = c["transitions"]
    if t.get("available"):
        mc = t["most_above_baseline"]
        con.print(f"  next-layer expert concentration (mean max P(e'|e)): {_f(t['concentration_mean'])} "
                  f"vs {_f(t['independent_baseline_mean'])} if independent of the previous expert, "
                  f"{_f(t['uniform_baseline'], 3)} for uniform routing; most above baseline "
                  f"{mc['layer']}→{mc['next_layer']}: {_f(mc['concentration'])} vs {_f(mc['independent_baseline'])}")
    else:
        con.print(f"  transitions: [yellow]not available[/]: {t['reason']}")
