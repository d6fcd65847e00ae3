"""Turn the artifacts of analyze (and of place / simulate) into a :class:`Report`.

Each section builder reads numbers through :mod:`moeprof.report.view`, writes its finding as one
sentence computed from them, picks the figures analyze drew and a table. A section whose statistics
are not in the inputs says why (the reason analyze recorded, or what input is missing).
"""

from __future__ import annotations

import datetime as _dt
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

from moeprof import __version__
from moeprof.report import view
from moeprof.report.document import Figure, Report, Section, Table, fmt
from moeprof.report.view import Inputs, Unavailable

SECTIONS = [
    ("model", "Model and workload"),
    ("imbalance", "Load imbalance"),
    ("domain", "Domain shift"),
    ("prefill_decode", "Prefill → decode"),
    ("coactivation", "Co-activation"),
    ("placement", "Placement comparison"),
]


def resolve_inputs(paths: list[Path], *, analysis_dir: Path | None = None) -> Inputs:
    """Discover the inputs; if a trace came without a summary, analyse it (into ``analysis_dir``, or a
    temporary directory whose figures are read before it goes)."""
    inputs = view.discover([Path(p) for p in paths])
    if inputs.summary is None and inputs.trace_path is not None:
        out = analysis_dir or Path(tempfile.mkdtemp(prefix="moeprof-report-"))
        run_analysis(inputs.trace_path, out)
        inputs.summary_path = out / view.SUMMARY
        inputs.summary = view.read_json(inputs.summary_path, "analyze summary")
        inputs.figure_dirs.insert(0, out)
    return inputs


def run_analysis(trace_path: Path, out: Path) -> None:
    """Run ``moeprof analyze TRACE --out OUT`` as a library call (summary.json and its figures)."""
    from moeprof.analysis import analyze_to_dir

    analyze_to_dir(trace_path, out, force=True)


def build_report(inputs: Inputs, *, title: str | None = None) -> Report:
    s = inputs.summary or {}
    model = (s.get("model") or {}) if s else {}
    builders: dict[str, Callable[[Inputs], Section]] = {
        "model": _model,
        "imbalance": _imbalance,
        "domain": _domain,
        "prefill_decode": _prefill_decode,
        "coactivation": _coactivation,
        "placement": _placement,
    }
    sections = []
    for key, heading in SECTIONS:
        section = Section(key, heading)
        try:
            built = builders[key](inputs)
            built.key, built.title = key, heading
            section = built
        except Unavailable as exc:
            section.unavailable = str(exc)
        if key == "placement" and section.unavailable and inputs.compare is None and inputs.placement is None:
            continue  # "where one exists": no placement input, no section
        sections.append(section)
    name = model.get("name") or "routing"
    facts = []
    if model:
        facts.append(("model", f"{name} ({model.get('architecture') or '?'})"))
    if inputs.trace_path or (s.get("trace") or {}).get("path"):
        facts.append(("trace", str(inputs.trace_path or s["trace"]["path"])))
    if inputs.summary_path:
        facts.append(("summary", str(inputs.summary_path)))
    if inputs.compare_path:
        facts.append(("placement comparison", str(inputs.compare_path)))
    return Report(
        title=title or f"MoE routing report: {name}",
        subtitle="How tokens were routed to experts on this workload, and what it means for serving it.",
        sections=sections,
        inputs=list(inputs.sources),
        generated_at=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        moeprof_version=__version__,
        facts=facts,
    )


# -- helpers ---------------------------------------------------------------------------------------
def _figures(inputs: Inputs, names: list[tuple[str, str]]) -> list[Figure]:
    """The first of ``name.svg`` / ``name.png`` found in the figure directories, per (stem, title)."""
    out = []
    for stem, title in names:
        for d in inputs.figure_dirs:
            hit = next((d / f"{stem}{ext}" for ext in (".svg", ".png") if (d / f"{stem}{ext}").exists()), None)
            if hit is None:
                hit = next((p for ext in (".svg", ".png") for p in sorted(d.glob(f"**/{stem}{ext}"))), None)
            if hit is not None:
                out.append(Figure.from_file(hit, title))
                break
    return out


def _x(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}×"


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _need(inputs: Inputs, key: str) -> dict[str, Any]:
    return view._need(inputs.summary, key, key)


# -- sections --------------------------------------------------------------------------------------
def _model(inputs: Inputs) -> Section:
    s = inputs.summary
    if s is None:
        raise Unavailable("no analysis in the inputs")
    m = s.get("model") or {}
    t = s.get("trace") or {}
    tokens = t.get("tokens_per_phase") or {}
    domains = t.get("requests_per_domain") or {}
    moe = m.get("moe_layers") or []
    finding = (
        f"{m.get('name', '?')} routes each token to {m.get('top_k', '?')} of {m.get('num_experts', '?')} experts "
        f"in {len(moe)} MoE layers; the workload is {fmt(t.get('requests'))} requests"
        + (f" in {len(domains)} domains" if domains else "")
        + (
            f" ({fmt(tokens.get('prefill'))} prefill and {fmt(tokens.get('decode'))} decode tokens)."
            if tokens
            else "."
        )
    )
    rows = [
        ["model", f"{m.get('name', '?')} ({m.get('architecture') or '?'})"],
        ["MoE layers", f"{len(moe)}: {_ranges(moe)}"],
        ["experts", f"{m.get('num_experts', '?')} routed, top-{m.get('top_k', '?')}"
         + (f", {m['num_shared_experts']} shared" if m.get("num_shared_experts") else "")],
        ["trace source", str(t.get("source", "?")) + ("" if t.get("complete", True) else " (capture interrupted)")],
        ["requests", fmt(t.get("requests"))],
    ]
    rows += [[f"  {d}", fmt(n)] for d, n in domains.items()]
    rows += [[f"{p} tokens", fmt(n)] for p, n in sorted(tokens.items())]
    for cap, why in (t.get("missing") or {}).items():
        rows.append([f"not recorded: {cap}", why])
    table = Table(["", ""], rows, numeric=[False, False])
    sec = Section("model", "", finding=finding, tables=[table])
    for reason_key, why in (s.get("unavailable") or {}).items():
        sec.notes.append(f"Not computed: {reason_key} ({why}).")
    return sec


def _imbalance(inputs: Inputs) -> Section:
    node = _need(inputs, "imbalance")
    rows = node["per_layer"]
    worst = max(rows, key=lambda r: -1 if r["max_over_mean"] is None else r["max_over_mean"])
    batch_rows = node.get("batches") or []
    sizes = sorted({r["batch_size"] for r in batch_rows if r.get("median") is not None})
    at_b = ""
    pick = None
    if sizes:
        pick = 64 if 64 in sizes else sizes[len(sizes) // 2]
        br = next((r for r in batch_rows if r["batch_size"] == pick and r["layer"] == worst["layer"]), None)
        if br and br.get("median") is not None:
            at_b = f" (over batches of {pick} tokens: median {_x(br['median'])}, p90 {_x(br['p90'])})"
    finding = (
        f"Layer {worst['layer']} is the most imbalanced: its busiest expert gets {_x(worst['max_over_mean'])} "
        f"the mean load over the whole trace{at_b}"
        + (f"; {worst['dead']} of its experts got no token." if worst.get("dead") else ".")
    )
    cols = ["layer", "max/mean", "CV", "Gini", "entropy", "dead", "hot 10% share"]
    if pick:
        cols += [f"B={pick} median", f"B={pick} p90"]
    table_rows = []
    for r in rows:
        row = [str(r["layer"]), _x(r["max_over_mean"]), fmt(r.get("cv")), fmt(r.get("gini")), fmt(r.get("entropy")),
               fmt(r.get("dead")), _pct(r.get("hot_share"))]
        if pick:
            br = next((b for b in batch_rows if b["batch_size"] == pick and b["layer"] == r["layer"]), {})
            row += [_x(br.get("median")), _x(br.get("p90"))]
        table_rows.append(row)
    figures = _figures(inputs, [
        ("load_heatmap", "Token-routes per expert and layer, as a multiple of the layer's mean"),
        ("imbalance_vs_batch", "Busiest expert / mean expert over batches of B tokens (median and p90, 95% CI)"),
    ])
    return Section("imbalance", "", finding=finding, figures=figures,
                   tables=[Table(cols, table_rows, caption="Per MoE layer, over the whole trace")])


def _domain(inputs: Inputs) -> Section:
    node = _need(inputs, "domain")
    pairs = node.get("pairs") or []
    if not pairs:
        raise Unavailable(node.get("reason") or "fewer than two domains in the trace")
    top = max(pairs, key=lambda r: r["js"])
    acc = node.get("accuracy") or {}
    finding = (
        f"Domains differ most in layer {top['layer']}: {top['domain_a']} vs {top['domain_b']} have a JS divergence "
        f"of {top['js']:.3f}"
        + (f" and share {_pct(top.get('jaccard'))} of their hot experts" if top.get("jaccard") is not None else "")
        + (
            f"; a request's domain is predicted from its prefill routing with {_pct(acc['accuracy'])} accuracy "
            f"on {acc.get('test_requests', '?')} held-out requests (chance {_pct(acc.get('chance'))})."
            if acc.get("accuracy") is not None
            else "."
        )
    )
    by_layer: dict[int, list[dict]] = {}
    for r in pairs:
        by_layer.setdefault(r["layer"], []).append(r)
    rows = []
    for layer in sorted(by_layer):
        rs = by_layer[layer]
        mx = max(rs, key=lambda r: r["js"])
        jac = [r["jaccard"] for r in rs if r.get("jaccard") is not None]
        rows.append([str(layer), f"{mx['js']:.3f}", f"{mx['domain_a']} vs {mx['domain_b']}",
                     f"{sum(r['js'] for r in rs) / len(rs):.3f}", _pct(sum(jac) / len(jac)) if jac else "-"])
    figures = _figures(inputs, [
        ("domain_js", "Jensen-Shannon divergence between domains, per layer"),
        ("domain_popularity", "Expert popularity per domain"),
    ])
    return Section("domain", "", finding=finding, figures=figures, tables=[
        Table(["layer", "max JS", "pair", "mean JS", "mean hot-set overlap"], rows,
              caption="Per MoE layer: JS divergence (base 2) between domains' expert popularity")])


def _prefill_decode(inputs: Inputs) -> Section:
    node = _need(inputs, "prefill_decode")
    rows = node["per_layer"]
    agg = [r["aggregate_pearson"] for r in rows if r.get("aggregate_pearson") is not None]
    own = [r["pearson"] for r in rows if r.get("pearson") is not None]
    same = [r["same_domain_pearson"] for r in rows if r.get("same_domain_pearson") is not None]
    other = [r["other_domain_pearson"] for r in rows if r.get("other_domain_pearson") is not None]
    lowest = min(rows, key=lambda r: r["aggregate_pearson"])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    finding = (
        f"Prefill routing predicts decode routing: aggregate Pearson {mean(agg):.2f} averaged over layers "
        f"(lowest {lowest['aggregate_pearson']:.2f} at layer {lowest['layer']}); per request {mean(own):.2f}, "
        f"against {mean(same):.2f} for another request of the same domain and {mean(other):.2f} for one of "
        "another domain."
    )
    recall_cols = sorted((k for k in rows[0] if k.startswith("recall_at_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    cols = ["layer", "aggregate r", "aggregate ρ", "per-request r", "same-domain r", "other-domain r"]
    cols += [f"recall@{k.rsplit('_', 1)[1]}" for k in recall_cols]
    table_rows = [
        [str(r["layer"]), fmt(r.get("aggregate_pearson")), fmt(r.get("aggregate_spearman")), fmt(r.get("pearson")),
         fmt(r.get("same_domain_pearson")), fmt(r.get("other_domain_pearson"))]
        + [_pct(r.get(k)) for k in recall_cols]
        for r in rows
    ]
    figures = _figures(inputs, [("prefill_decode", "Prefill vs decode correlation per layer, with controls")])
    return Section("prefill_decode", "", finding=finding, figures=figures, tables=[
        Table(cols, table_rows, caption="Pearson (r) / Spearman (ρ) between prefill and decode expert counts")])


def _coactivation(inputs: Inputs) -> Section:
    node = _need(inputs, "coactivation")
    trans = node.get("top_transitions") or []
    pairs = node.get("top_pairs") or []
    if not trans and not pairs:
        raise Unavailable(node.get("reason") or "no co-activation statistics in the summary")
    parts = []
    if trans:
        t = trans[0]
        parts.append(
            f"the strongest cross-layer transition is expert {t['expert']} (layer {t['layer']}) → expert "
            f"{t['next_expert']} (layer {t['next_layer']}), taken by {_pct(t['probability'])} of its tokens"
            + (f" ({t['lift']:.1f}× chance)" if t.get("lift") is not None else "")
        )
    if pairs:
        p = pairs[0]
        parts.append(
            f"experts {p['expert_a']} and {p['expert_b']} of layer {p['layer']} are chosen together "
            f"{fmt(p['count'])} times" + (f" ({p['lift']:.1f}× chance)" if p.get("lift") is not None else "")
        )
    finding = "; ".join(parts)
    finding = finding[0].upper() + finding[1:] + "."
    tables = []
    if trans:
        tables.append(Table(
            ["layer", "expert", "next layer", "next expert", "P(next | expert)", "lift"],
            [[str(t["layer"]), str(t["expert"]), str(t["next_layer"]), str(t["next_expert"]), _pct(t["probability"]),
              fmt(t.get("lift"))] for t in trans[:15]],
            caption="Strongest transitions between consecutive MoE layers"))
    if pairs:
        tables.append(Table(
            ["layer", "expert a", "expert b", "tokens", "lift"],
            [[str(p["layer"]), str(p["expert_a"]), str(p["expert_b"]), fmt(p["count"]), fmt(p.get("lift"))]
             for p in pairs[:15]],
            caption="Most frequent expert pairs chosen by one token within a layer"))
    figures = _figures(inputs, [("transitions", "Cross-layer transitions P(e' | e)"),
                                ("coactivation", "Within-layer co-activation")])
    return Section("coactivation", "", finding=finding, figures=figures, tables=tables)


def _placement(inputs: Inputs) -> Section:
    if inputs.compare is None:
        raise Unavailable("no `moeprof simulate --compare` result in the inputs")
    rows = inputs.compare.get("policies") or []
    if not rows:
        raise Unavailable(f"{inputs.compare_path} lists no policies")
    base = next((r for r in rows if r["policy"] == "linear"), rows[0])
    best = min(rows, key=lambda r: r["cross_node_bytes"])
    cut = 1 - best["cross_node_bytes"] / base["cross_node_bytes"] if base["cross_node_bytes"] else 0.0
    finding = (
        f"{best['policy']} sends the fewest bytes across nodes: {fmt(best['cross_node_bytes'], 0)} B per token, "
        f"{_pct(cut)} less than {base['policy']}, with the busiest GPU at {_x(best.get('gpu_imbalance'))} the mean "
        f"load ({base['policy']}: {_x(base.get('gpu_imbalance'))}) on held-out requests."
    )
    cols = ["policy", "cross-node B/token", "intra-node B/token", "local share", "GPU max/mean"]
    table_rows = [
        [r["policy"], fmt(r["cross_node_bytes"], 0), fmt(r.get("intra_node_bytes"), 0), _pct(r.get("local_share")),
         _x(r.get("gpu_imbalance"))]
        for r in rows
    ]
    figures = _figures(inputs, [("compare", "Cross-node traffic and GPU load per policy (held-out requests)")])
    return Section("placement", "", finding=finding, figures=figures, tables=[Table(cols, table_rows)])


def _ranges(xs: list[int]) -> str:
    from moeprof.report.terminal import _ranges as ranges

    return ranges(xs)


# -- writing ---------------------------------------------------------------------------------------
OUTPUTS = ("index.html", "summary.md", "report.json")


def write_report(paths: list[Path], out: Path, *, force: bool = False) -> tuple[Report, dict[str, Path]]:
    """``moeprof report``: analyse (if given a trace), build the report, write index.html, summary.md and
    report.json into ``out``. A trace's analysis (summary.json and figures) goes to ``out/analysis``."""
    import json
    import shutil

    from moeprof.errors import OutputExistsError
    from moeprof.report.html import render_html
    from moeprof.report.markdown import render_markdown

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OutputExistsError(f"{out}: exists and is not empty; pass --force to replace it")
        for name in (*OUTPUTS, "analysis"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    inputs = resolve_inputs(paths, analysis_dir=out / "analysis")
    report = build_report(inputs)
    files = {name: out / name for name in OUTPUTS}
    _atomic_write(files["index.html"], render_html(report))
    _atomic_write(files["summary.md"], render_markdown(report))
    payload = {"report": report.to_json(), "summary": inputs.summary, "compare": inputs.compare,
               "placement": inputs.placement}
    _atomic_write(files["report.json"], json.dumps(payload, indent=1, default=str) + "\n")
    return report, files


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
