"""Turn the artifacts of analyze (and of place / simulate) into a :class:`Report`.

Each section builder reads numbers through :mod:`moeprof.report.view`, writes its finding as one
sentence computed from them, picks the figures analyze drew and a table. A section whose statistics
are not in the inputs says why (the reason analyze recorded, or what input is missing).
"""

from __future__ import annotations

import datetime as _dt
import math
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable

from moeprof.errors import UsageError
from moeprof.text import format_ranges
from moeprof import __version__
from moeprof.report import view
from moeprof.report.document import Figure, Report, Section, Table, fmt
from moeprof.report.view import Inputs, Unavailable

STRONG_LIFT = 1.5  # a pair chosen together this many times more often than chance is worth a sentence
SAME_JS = 0.02  # below this JS divergence (bits) two domains' expert popularity is "alike"
LOAD_SLACK = 1.1  # a placement "wins" on bytes only with its busiest GPU within this × the reference's (eplb)
MIN_PAIR_TOKENS = 100  # a co-activated pair leads the finding only when this many tokens chose it
MIN_SPECIALIST_SHARE = 0.005  # specialist tables list experts with at least this share of the domain's load

SECTIONS = [
    ("model", "Model and workload"),
    ("imbalance", "Load imbalance"),
    ("domain", "Domain shift"),
    ("prefill_decode", "Prefill → decode"),
    ("coactivation", "Co-activation"),
    ("placement", "Placement comparison"),
    ("timeline", "Placement over time"),
]


def resolve_inputs(paths: list[Path], *, analysis_dir: Path | None = None, figures: bool = True,
                   workers: bool = False) -> Inputs:
    """Discover the inputs; if a trace came without a summary, analyse it (into ``analysis_dir``, or a
    temporary directory whose figures are read before it goes), with its figures unless ``figures`` is
    false (a caller that only reads numbers); ``workers``: see :func:`run_analysis`."""
    inputs = view.discover(list(paths))
    if inputs.summary is not None and inputs.trace_path is not None:
        _same_trace(inputs.summary, inputs.summary_path, inputs.trace_path)
    if inputs.summary is None and inputs.trace_path is not None:
        out = analysis_dir
        if out is None:
            # removed with ``inputs`` (or at exit): each `check TRACE` left one in the temporary directory
            out = Path(tempfile.mkdtemp(prefix="moeprof-report-"))
            weakref.finalize(inputs, shutil.rmtree, out, True)
        run_analysis(inputs.trace_path, out, figures=figures, workers=workers)
        inputs.summary_path = out / view.SUMMARY
        inputs.summary = view.read_summary(inputs.summary_path)
        inputs.figure_dirs.insert(0, out)
    _same_model(inputs)
    return inputs


def _same_model(inputs: Any) -> None:
    """Raise when a placement (or a --compare result, through the placements beside it) was fitted on
    another model than the analysis describes: the report would show one's numbers under the other's."""
    model = ((inputs.summary or {}).get("trace") or {}).get("model")
    if not model:
        return
    placed = []
    if inputs.placement is not None:
        placed.append((inputs.placement_path, inputs.placement))
    if inputs.compare_path is not None:
        import json

        for p in sorted(Path(inputs.compare_path).parent.glob("placement-*.json"))[:1]:
            try:
                placed.append((p, json.loads(p.read_text(encoding="utf-8"))))
            except (OSError, ValueError):
                pass
    for path, placement in placed:
        theirs = placement.get("model") or {}
        fitted = (theirs.get("name"), theirs.get("num_experts"), placement.get("moe_layers"))
        analysed = (model.get("name"), model.get("num_experts"), model.get("moe_layers"))
        if None not in fitted and fitted != analysed:
            raise UsageError(
                f"{path} was fitted on model {fitted[0]} ({fitted[1]} experts, MoE layers "
                f"{format_ranges(fitted[2])}), the analysis is of {analysed[0]} ({analysed[1]} experts, MoE layers "
                f"{format_ranges(analysed[2] or [])}); give the placement or --compare result of the analysed trace"
            )


def _same_trace(summary: dict, summary_path: Any, trace_path: Any) -> None:
    """Raise when a trace and an analysis of another trace are given together: the report would show the
    analysis under the trace's name (the analysis is used; the trace is not read again)."""
    from moeprof.trace.reader import Trace

    described = summary.get("trace") or {}
    m = Trace.open(trace_path, verify="none")
    model = described.get("model") or {}
    ours = (m.model.name, m.model.num_experts, m.model.top_k, list(m.model.moe_layers), m.num_routing_rows)
    theirs = (model.get("name"), model.get("num_experts"), model.get("top_k"), model.get("moe_layers"),
              described.get("routing_rows"))
    if ours != theirs:
        raise UsageError(
            f"{summary_path} is the analysis of another trace ({described.get('path')}: {theirs[4]} routing rows of "
            f"{theirs[0]}), not of {trace_path} ({ours[4]} routing rows of {ours[0]}); give the trace alone "
            "(it is analysed now) or its own analysis"
        )


def run_analysis(trace_path: Path, out: Path, *, figures: bool = True, workers: bool = False) -> None:
    """Run ``moeprof analyze TRACE --out OUT`` as a library call (summary.json and its figures). With
    ``workers`` the figures are drawn in worker processes started before the analysis
    (:class:`moeprof.report.figures.FigureWriter`): only for a program whose main module can be imported
    again without running it (``if __name__ == "__main__":``), as moeprof's command line can."""
    from contextlib import nullcontext

    from moeprof.analysis.run import analyze
    from moeprof.report.figures import FigureWriter
    from moeprof.report.plots import write_plots

    if not figures:
        analyze(trace_path, out=out, force=True)
        return
    with FigureWriter() if workers else nullcontext(write_plots) as draw_figures:
        analyze(trace_path, out=out, force=True, writers=[draw_figures])


def build_report(inputs: Inputs, *, title: str | None = None) -> Report:
    s = inputs.summary or {}
    model = (s.get("trace") or {}).get("model") or {}
    builders: dict[str, Callable[[Inputs], Section]] = {
        "model": _model,
        "imbalance": _imbalance,
        "domain": _domain,
        "prefill_decode": _prefill_decode,
        "coactivation": _coactivation,
        "placement": _placement,
        "timeline": _timeline,
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
        if key == "timeline" and inputs.timeline is None:
            continue
        sections.append(section)
    name = model.get("name") or "routing"
    facts = []
    if model:
        facts.append(("model", f"{name}: {model.get('num_experts', '?')} experts, top-{model.get('top_k', '?')}"))
    if inputs.trace_path or (s.get("trace") or {}).get("path"):
        facts.append(("trace", str(inputs.trace_path or s["trace"]["path"])))
    if inputs.summary_path:
        facts.append(("summary", str(inputs.summary_path)))
    if inputs.compare_path:
        facts.append(("placement comparison", str(inputs.compare_path)))
    if inputs.timeline_path:
        facts.append(("placement over time", str(inputs.timeline_path)))
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


# -- sections --------------------------------------------------------------------------------------
def _model(inputs: Inputs) -> Section:
    s = inputs.summary
    if s is None:
        raise Unavailable("no analysis among the inputs (give a trace or an analyze output directory)")
    t = s.get("trace") or {}
    m = t.get("model") or {}
    domains = t.get("requests_per_domain") or {}
    moe = m.get("moe_layers") or []
    analysed = (s.get("selection") or {}).get("layers") or moe
    n_req = t.get("requests") or 0
    workload = (
        f"the workload is {fmt(n_req)} request{'s' if n_req != 1 else ''}" + (f" in {len(domains)} domains" if domains else "")
        if n_req else "the trace names no request"
    )
    finding = (
        f"Model {m.get('name', '?')} routes each token to {m.get('top_k', '?')} of {m.get('num_experts', '?')} experts in "
        f"{len(moe)} MoE layer{'s' if len(moe) != 1 else ''}; {workload}, "
        f"{fmt(t.get('tokens'))} tokens and {fmt(t.get('token_routes'))} token-routes."
    )
    rows = [
        ["model", str(m.get("name", "?"))],
        ["MoE layers", f"{len(moe)} ({format_ranges(moe)})" + (f"; analysed: {format_ranges(analysed)}" if analysed != moe else "")],
        ["experts", f"{m.get('num_experts', '?')} routed, top-{m.get('top_k', '?')}"],
        ["trace", f"{t.get('path', '?')} (source {t.get('source', '?')}"
         + (")" if t.get("complete", True) else ", capture interrupted: incomplete)")],
        ["routing", "per-token rows" if t.get("per_token", True) else "count tables only (no per-token rows)"],
        ["routing rows", fmt(t.get("routing_rows"))],
        ["requests", fmt(t.get("requests"))],
    ]
    rows += [[f"requests: {d}", fmt(n)] for d, n in domains.items()]
    for cap, why in (t.get("missing") or {}).items():
        rows.append([f"not recorded: {cap}", str(why)])
    sec = Section("model", "", finding=finding, tables=[Table(["", ""], rows, numeric=[False, False], header=False)])
    sec.notes += [str(n) for n in s.get("notes") or []]
    return sec


def _imbalance(inputs: Inputs) -> Section:
    node = view.need(inputs, "imbalance")
    rows = node["per_layer"]
    worst = max(rows, key=lambda r: -1.0 if r["max_over_mean"] is None else r["max_over_mean"])
    # Batch-level: per layer from analyze's table, pooled over layers from the summary.
    batch_note, pick, per_layer_b = "", None, {}
    try:
        bnode = view.need(inputs, "batch_imbalance")
        sizes = [b["batch_size"] for b in bnode["batches"] if b.get("available", True) and b.get("median") is not None]
    except Unavailable as exc:
        bnode, sizes = None, []
        batch_note = f"Imbalance over batches is not available: {exc}."
    if sizes:
        pick = 64 if 64 in sizes else sizes[len(sizes) // 2]
        try:
            per_layer_b = {v.layer: v.value for v in view.imbalance(inputs, pick, "median")}
            p90_b = {v.layer: v.value for v in view.imbalance(inputs, pick, "p90")}
        except Unavailable:
            per_layer_b, p90_b = {}, {}
        if worst["layer"] in per_layer_b:
            at = f" (over batches of {pick} tokens: median {_x(per_layer_b[worst['layer']])}, p90 {_x(p90_b[worst['layer']])})"
        else:
            pooled = next(b for b in bnode["batches"] if b["batch_size"] == pick)
            at = f" (over batches of {pick} tokens, all layers: median {_x(pooled['median'])}, p90 {_x(pooled['p90'])})"
    else:
        at = ""
    dead = worst.get("dead") or 0
    finding = (
        f"Layer {worst['layer']} is the most imbalanced: its busiest expert gets {_x(worst['max_over_mean'])} the "
        f"mean load over the whole trace{at}" + (f", and {dead} of its experts get no token." if dead else ".")
    )
    cols = ["layer", "tokens", "max/mean", "CV", "Gini", "entropy", "dead", "top-10% share"]
    if per_layer_b:
        cols += [f"B={pick} median", f"B={pick} p90"]
    table_rows = []
    for r in rows:
        row = [str(r["layer"]), fmt(r.get("tokens")), _x(r["max_over_mean"]), fmt(r.get("cv")), fmt(r.get("gini")),
               fmt(r.get("entropy")), fmt(r.get("dead")), _pct(r.get("hot_share"))]
        if per_layer_b:
            row += [_x(per_layer_b.get(r["layer"])), _x(p90_b.get(r["layer"]))]
        table_rows.append(row)
    tables = [Table(cols, table_rows, caption="Per MoE layer, over the whole trace"
                    + (f" (and over batches of {pick} tokens)" if per_layer_b else ""))]
    if bnode is not None:
        brows = [
            [fmt(b["batch_size"]), fmt(b.get("batches")), _x(b.get("median")), _ci(b.get("median_ci")),
             _x(b.get("p90")), _ci(b.get("p90_ci"))]
            if b.get("available", True) else [fmt(b["batch_size"]), "0", "-", "-", "-", b.get("reason", "-")]
            for b in bnode["batches"]
        ]
        tables.append(Table(["batch size", "batches", "median", "95% CI", "p90", "95% CI"], brows,
                            caption="Busiest expert / mean over batches of B tokens, all layers pooled. "
                            + _sentence(str(bnode.get("method", "")))))
    figures = _figures(inputs, [
        ("load_heatmap", "Load per expert and layer (multiple of the layer mean)"),
        ("imbalance_vs_batch", "Busiest expert / mean expert over batches of B tokens (median, p90)"),
    ])
    sec = Section("imbalance", "", finding=finding, figures=figures, tables=tables)
    if batch_note:
        sec.notes.append(batch_note)
    return sec


def _domain(inputs: Inputs) -> Section:
    node = view.need(inputs, "domain_shift")
    pairs = node["pairs"]
    top = max(pairs, key=lambda r: r["js_max"] if r.get("js_max") is not None else -1)
    per_layer = {v.layer: v for v in view.domain_js_max(inputs)}
    worst = max(per_layer.values(), key=lambda v: v.value)
    where = f"layer {worst.layer}" if worst.layer is not None else "its most divergent layer"
    acc_text = ""
    try:
        acc = view.need(inputs, "classification")
        acc_text = (
            f"; a request's domain is predicted from its prefill routing with {_pct(acc['accuracy'])} accuracy on "
            f"{acc.get('test_requests', '?')} held-out requests (chance {_pct(acc.get('chance'))})"
        )
    except Unavailable as exc:
        acc, acc_text = None, ""
        acc_reason = str(exc)
    verdict = "Domains route differently" if top["js_max"] >= SAME_JS else "Domains route alike"
    finding = (
        f"{verdict}: {top['domain_a']} and {top['domain_b']} differ most, JS divergence "
        f"{top['js_max']:.3f} in {where} ({top['js_mean']:.3f} averaged over layers){acc_text}."
    )
    rows = [
        [f"{r['domain_a']} vs {r['domain_b']}", f"{r['js_mean']:.3f}", f"{r['js_max']:.3f}", _pct(r.get("jaccard_mean"))]
        for r in sorted(pairs, key=lambda r: -r["js_mean"])
    ]
    tables = [Table(["domains", "mean JS", "max JS", "hot-set overlap"], rows,
                    caption="JS divergence (base 2, 0 = same popularity, 1 = disjoint) per domain pair, over layers")]
    # An expert a domain barely uses is no specialist of it, whatever its lift.
    spec = [r for r in node.get("top_specialists") or [] if (r.get("share") or 0.0) >= MIN_SPECIALIST_SHARE]
    if spec:
        tables.append(Table(
            ["domain", "layer", "expert", "lift", "share of domain load"],
            [[r["domain"], str(r["layer"]), str(r["expert"]), f"{r['lift']:.1f}×", _pct(r.get("share"))] for r in spec],
            caption=f"Specialist experts: lift p(d,l,e)/p(l,e) above {node.get('specialist_lift', 2)}, "
                    f"with at least {_pct(MIN_SPECIALIST_SHARE)} of the domain's load"))
    sec = Section("domain", "", finding=finding, tables=tables, figures=_figures(inputs, [
        ("domain_js", "JS divergence between domains"),
        ("domain_popularity", "Expert popularity per domain"),
    ]))
    if acc is None:
        sec.notes.append(f"Domain classification not available: {acc_reason}.")
    return sec


def _prefill_decode(inputs: Inputs) -> Section:
    node = view.need(inputs, "prefill_decode")
    rows = node["per_layer"]
    defined = [r for r in rows if r.get("aggregate_pearson") is not None]
    if not defined or node.get("aggregate_pearson") is None:
        raise Unavailable(
            "the correlation is undefined: prefill or decode expert counts are constant (e.g. uniform) in every layer"
        )
    lowest = min(defined, key=lambda r: r["aggregate_pearson"])
    controls = node.get("controls") or {}
    ctl = []
    for key, label in (("same_domain", "another request of the same domain"), ("other_domain", "one of another domain")):
        c = controls.get(key) or {}
        if c.get("available", False) and c.get("pearson") is not None:
            ctl.append(f"{c['pearson']:.2f} for {label}")
    own = node.get("pearson")
    finding = (
        f"Prefill routing {_predicts(node['aggregate_pearson'])} decode routing: aggregate Pearson "
        f"{node['aggregate_pearson']:.2f} averaged over "
        f"layers (lowest {lowest['aggregate_pearson']:.2f}, layer {lowest['layer']})"
        + (f"; per request {own:.2f}" + (f", against {' and '.join(ctl)}" if ctl else "") if own is not None else "")
        + "."
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
    sec = Section("prefill_decode", "", finding=finding, tables=[
        Table(cols, table_rows, caption=f"Pearson (r) / Spearman (ρ) of prefill vs decode expert counts, "
              f"{node.get('requests', '?')} requests; controls pair a request's prefill with another request's decode")],
        figures=_figures(inputs, [("prefill_decode", "Prefill vs decode correlation per layer, with controls")]))
    for key, c in controls.items():
        if c.get("available") is False:
            sec.notes.append(f"Control '{key.replace('_', ' ')}' not available: {c.get('reason')}.")
    return sec


def _coactivation(inputs: Inputs) -> Section:
    node = view.need(inputs, "coactivation")
    pairs = (node.get("pairs") or {}).get("top_by_lift") or []
    trans = node.get("transitions") or {}
    parts = []
    if trans.get("available"):
        mc = trans.get("most_above_baseline") or trans["most_concentrated"]
        base = mc.get("independent_baseline")
        parts.append(
            f"layer {mc['layer']} → {mc['next_layer']} is the most predictable step: a token's expert in layer "
            f"{mc['layer']} points to its likeliest next expert with probability {mc['concentration']:.2f} on average"
            + (f", against {base:.2f} if the layers routed independently" if base is not None else "")
            + f" (uniform: {trans['uniform_baseline']:.2f})"
        )
    # Lift from a handful of tokens is noise (151× chance from 10 tokens): a pair leads the finding only
    # with MIN_PAIR_TOKENS tokens behind it, and the sentence says so.
    supported = [p for p in pairs if (p.get("count") or 0) >= MIN_PAIR_TOKENS]
    if supported:
        p = supported[0]
        if p["lift"] >= STRONG_LIFT:
            parts.append(
                f"experts {p['expert_a']} and {p['expert_b']} of layer {p['layer']} are chosen together "
                f"{p['lift']:.1f}× as often as chance ({fmt(p['count'])} tokens; pairs seen by at least "
                f"{MIN_PAIR_TOKENS} tokens)"
            )
        else:
            parts.append(f"no two experts of a layer are chosen together much more than chance among pairs seen by "
                         f"at least {MIN_PAIR_TOKENS} tokens (highest lift {p['lift']:.2f}×, experts {p['expert_a']} "
                         f"and {p['expert_b']} of layer {p['layer']})")
    elif pairs:
        parts.append(f"no expert pair was chosen by {MIN_PAIR_TOKENS} tokens or more, too few to call any pair "
                     "more frequent than chance")
    if not parts:
        raise Unavailable(trans.get("reason") or "no co-activation statistics in the summary")
    finding = "; ".join(parts)
    finding = finding[0].upper() + finding[1:] + "."
    tables = []
    if trans.get("available"):
        tables.append(Table(
            ["layer", "next layer", "concentration", "if independent"],
            [[str(r["layer"]), str(r["next_layer"]), fmt(r["concentration"], 3), fmt(r.get("independent_baseline"), 3)]
             for r in trans["per_pair"]],
            caption="Load-weighted mean over e of max over e' of P(e' | e), between consecutive MoE layers; "
                    "'if independent' is the next layer's largest share of tokens "
                    f"(uniform routing: {trans['uniform_baseline']:.3f})"))
    if pairs:
        tables.append(Table(
            ["layer", "expert a", "expert b", "tokens", "lift"],
            [[str(p["layer"]), str(p["expert_a"]), str(p["expert_b"]), fmt(p["count"]), f"{p['lift']:.2f}×"]
             for p in pairs],
            caption="Expert pairs one token selects together, highest lift first (lift = P(a and b) / P(a) P(b); "
                    "1.0 = chance); pairs seen by 10 tokens or more"))
    sec = Section("coactivation", "", finding=finding, tables=tables,
                  figures=_figures(inputs, [("transitions", "Cross-layer transitions P(e' | e)")]))
    if node.get("note"):
        sec.notes.append(str(node["note"]))
    if trans.get("available") is False:
        sec.notes.append(f"Transitions not available: {trans.get('reason')}.")
    return sec


def _sentence(text: str) -> str:
    text = text.strip()
    return (text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")) if text else ""


def _predicts(r: float) -> str:
    if r >= 0.7:
        return "strongly predicts"
    if r >= 0.4:
        return "predicts"
    if r >= 0.1:
        return "weakly predicts"
    return "does not predict"


def _ci(ci: list | None) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "-"
    return f"{ci[0]:.2f}–{ci[1]:.2f}"


def _placement(inputs: Inputs) -> Section:
    if inputs.compare is None:
        if inputs.placement is not None:
            return _single_placement(inputs)
        raise Unavailable("no `moeprof simulate --compare` result among the inputs")
    rows = view.compare_rows(inputs)
    if not rows:
        raise Unavailable(f"{inputs.compare_path} holds no policy")
    get = view.placement_value
    # The reference is eplb, as in the terminal table and the figure: the balance-only policy engines use.
    base = next((r for r in rows if r["key"] == "eplb"), next((r for r in rows if r["key"] == "linear"), rows[0]))
    fair = [r for r in rows if r.get("grouping") != "domain"] or rows  # the oracle label is a reference only
    # A policy wins on bytes only if its busiest GPU stays within LOAD_SLACK × the reference's: fewer bytes
    # bought with a far worse straggler GPU is no win (kmeans at 1.75× against locality's 1.29×).
    ref_load = get(base, "gpu_imbalance", "median")
    bound = LOAD_SLACK * ref_load if ref_load else None
    within = [r for r in fair if bound is None or (get(r, "gpu_imbalance", "median") or math.inf) <= bound]
    best = min(within or fair, key=lambda r: get(r, "cross_node_bytes"))
    fewest = min(fair, key=lambda r: get(r, "cross_node_bytes"))
    b0, b1 = get(base, "cross_node_bytes"), get(best, "cross_node_bytes")
    cut = 1 - b1 / b0 if b0 else 0.0
    topo = inputs.compare.get("topology") or {}
    load_rule = f"busiest GPU within {LOAD_SLACK:g}× {base['key']}'s" if bound else "any GPU load"
    if best is base:
        head = f"No policy beats {base['key']} on cross-node bytes with its {load_rule}: {_kib(b1)} per token"
    else:
        head = (f"Policy {best['key']} sends the fewest bytes across nodes among policies with the {load_rule} "
                f"(held-out requests): {_kib(b1)} per token, {_pct(cut)} less than {base['key']}, busiest GPU at "
                f"{_x(get(best, 'gpu_imbalance', 'median'))} the mean load per micro-batch (median; "
                f"{base['key']}: {_x(ref_load)})")
    if fewest is not best:
        head += (f"; {fewest['key']} sends fewer ({_kib(get(fewest, 'cross_node_bytes'))}) but its busiest GPU is "
                 f"at {_x(get(fewest, 'gpu_imbalance', 'median'))}")
    finding = head + "."
    cols = ["policy", "grouping", "cross-node KiB/token", f"vs {base['key']}", "intra-node KiB/token",
            "own-node share", "GPU max/mean median", "GPU max/mean p90"]
    table_rows = [
        [r["key"], str(r.get("grouping") or "-"), _kib(get(r, "cross_node_bytes"), unit=False),
         f"{get(r, 'cross_node_bytes') / b0 - 1:+.1%}" if b0 else "-", _kib(get(r, "intra_node_bytes"), unit=False),
         _pct(get(r, "local_share")), _x(get(r, "gpu_imbalance", "median")), _x(get(r, "gpu_imbalance", "p90"))]
        for r in rows
    ]
    where = ""
    if topo.get("nodes") and topo.get("gpus_per_node"):
        where = f"{topo['nodes']} nodes × {topo['gpus_per_node']} GPUs"
        if topo.get("slots_per_gpu"):
            where += f", {topo['slots_per_gpu']} expert slots per GPU"
        if topo.get("num_redundant_experts"):
            where += f", {topo['num_redundant_experts']} redundant"
    test_n = (inputs.compare.get("split") or {}).get("test_requests")
    if test_n:
        where += f"; {test_n} held-out requests"
    sec = Section("placement", "", finding=finding, tables=[Table(
        cols, table_rows, numeric=[False, False] + [True] * 6, caption="Every policy fitted on the train split and scored on held-out requests"
        + (f" ({where})" if where else ""))],
        figures=_figures(inputs, [("compare", "Cross-node traffic and GPU load per policy (held-out requests)")]))
    sec.notes += [str(n) for n in inputs.compare.get("notes") or []]
    return sec


def _kib(n: float | None, unit: bool = True) -> str:
    """Bytes per token in KiB, the unit of the comparison figure and the terminal table."""
    if n is None:
        return "-"
    return f"{n / 1024:,.1f}" + (" KiB" if unit else "")


def _single_placement(inputs: Inputs) -> Section:
    p = inputs.placement or {}
    m = p.get("metrics") or {}
    name = (p.get("policy") or {}).get("name") if isinstance(p.get("policy"), dict) else p.get("policy")
    get = view.placement_value
    if get(m, "cross_node_bytes") is None:
        raise Unavailable(f"{inputs.placement_path} has no simulated figures (run `moeprof simulate`)")
    finding = (
        f"Placement {name} sends {fmt(get(m, 'cross_node_bytes'), 0)} B per token across nodes on held-out requests, "
        f"serves {_pct(get(m, 'local_share'))} of token-routes on the token's own node, and its busiest GPU gets "
        f"{_x(get(m, 'gpu_imbalance', 'median'))} the mean load per micro-batch (median)."
    )
    rows = [[label, value] for label, value in (
        ("policy", str(name)),
        ("cross-node bytes / token", fmt(get(m, "cross_node_bytes"), 0)),
        ("intra-node bytes / token", fmt(get(m, "intra_node_bytes"), 0)),
        ("own-node share", _pct(get(m, "local_share"))),
        ("GPU max/mean, median", _x(get(m, "gpu_imbalance", "median"))),
        ("GPU max/mean, p90", _x(get(m, "gpu_imbalance", "p90"))),
    )]
    return Section("placement", "", finding=finding, tables=[Table(["", ""], rows, numeric=[False, True], header=False)])



def _timeline(inputs: Inputs) -> Section:
    """``simulate --timeline``: the verdict, every policy and schedule, the load/traffic and matrix figures."""
    d = inputs.timeline or {}
    rows = d.get("rows") or []
    if not rows or not d.get("verdict"):
        raise Unavailable(f"{inputs.timeline_path} holds no replayed schedule")
    cols = ["policy · schedule", "µs per step", "µs per MoE layer", "vs default", "comm share", "cross-node B/token",
            "busiest GPU max/mean", "rebalances", "weights moved"]
    table_rows = [
        [r["key"], f"{r['us_per_step']:.4g}", f"{r['moe_layer_us']:.4g}", f"{100 * r['vs_default']['step_time']:+.1f}%",
         _pct(r["comm_share"]),
         fmt(r["cross_node_bytes_per_token"], 0), _x(r["load_max_mean"]), str(r["rebalances"]),
         f"{r['migration_bytes'] / 2**20:,.0f} MiB"]
        for r in rows
    ]
    topo, hw = d.get("topology") or {}, d.get("hardware") or {}
    caption = (f"{d.get('passes', '?')} decode passes replayed in time order on {topo.get('nodes', '?')} nodes × "
               f"{topo.get('gpus_per_node', '?')} GPUs ({hw.get('name', '?')}); predicted MoE time per decode step, "
               "migrations at their steady-state rate (per MoE layer: without them)")
    sec = Section("timeline", "", finding=d["verdict"], tables=[Table(cols, table_rows, numeric=[False] + [True] * 8,
                                                                      caption=caption)],
                  figures=_figures(inputs, [("timeline", "Load, cross-node traffic and predicted step time over time"),
                                            ("traffic", "Rank × rank traffic, bytes per token")]))
    sec.notes += [f"time order: {d.get('time_order')}"] + [str(n) for n in d.get("notes") or []]
    return sec


# -- writing ---------------------------------------------------------------------------------------
OUTPUTS = ("index.html", "summary.md", "report.json")


def write_report(paths: list[Path], out: Path, *, force: bool = False,
                 workers: bool = False) -> tuple[Report, dict[str, Path]]:
    """``moeprof report``: analyse (if given a trace), build the report, write index.html, summary.md and
    report.json into ``out``. A trace's analysis (summary.json and figures) goes to ``out/analysis``.

    Written whole or not at all; ``force`` replaces only these entries, and only where moeprof wrote
    them: anything else in ``out`` (an analysis given as input, the user's files) is left as it is.
    ``workers``: see :func:`run_analysis`."""
    import json

    from moeprof.outputs import staged_files
    from moeprof.report.html import render_html
    from moeprof.report.markdown import render_markdown

    out = Path(out)
    names = list(OUTPUTS) + (["analysis"] if _needs_analysis(paths) else [])
    with staged_files(out, names, force, kind="report") as tmp:
        inputs = resolve_inputs(paths, analysis_dir=tmp / "analysis", workers=workers)
        report = build_report(inputs)
        _atomic_write(tmp / "index.html", render_html(report))
        _atomic_write(tmp / "summary.md", render_markdown(report))
        payload = {"report": report.to_json(), "summary": inputs.summary, "compare": inputs.compare,
                   "placement": inputs.placement, "timeline": inputs.timeline}
        _atomic_write(tmp / "report.json", json.dumps(payload, indent=1, default=str) + "\n")
    return report, {name: out / name for name in OUTPUTS}


def _needs_analysis(paths: list[Path]) -> bool:
    """True when the inputs hold a trace but no analysis: the report analyses it into ``out/analysis``."""
    inputs = view.discover(list(paths))
    return inputs.summary is None and inputs.trace_path is not None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
