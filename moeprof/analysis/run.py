"""``moeprof analyze``: aggregate a trace once, compute every statistic, write summary and tables.

:func:`analyze_trace` is the pure part (a trace in, an :class:`Analysis` out); :func:`analyze` adds
the outputs (``summary.json``, Parquet tables, and the files of the writers its caller passes: the
report layer's plots, :func:`moeprof.report.plots.write_plots`). A statistic the trace cannot support
is reported as ``{"available": false, "reason": ...}``, never as zero and never silently left out.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import polars as pl

from moeprof.text import format_ranges
from moeprof.analysis import coactivation as co
from moeprof.analysis import domain as dom
from moeprof.analysis import load
from moeprof.analysis import phase as ph
from moeprof.analysis.aggregate import (DEFAULT_SAMPLE_REQUESTS, DEFAULT_SAMPLE_TOKENS, Aggregates, Selection,
                                       aggregate_loads, aggregate_routing, row_groups, sample_requests as pick_requests)
from moeprof.errors import AnalysisError, UsageError
from moeprof.trace.reader import Trace

SUMMARY_FORMAT = "1.0"
SUMMARY_FILE = "summary.json"
DEFAULT_BATCH_SIZES = (1, 8, 64, 512, 4096)


@dataclass
class Analysis:
    """Everything ``analyze`` computed: the summary (JSON-ready), tables, and arrays for the plots."""

    summary: dict[str, Any]
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict)


class _Tables(dict):
    """The tables of an :class:`Analysis`, calling ``on_table(name, frame)`` as each is added."""

    def __init__(self, on_table: Callable[[str, pl.DataFrame], None]) -> None:
        super().__init__()
        self._on_table = on_table

    def __setitem__(self, name: str, frame: pl.DataFrame) -> None:
        super().__setitem__(name, frame)
        self._on_table(name, frame)


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def _finite(x: Any) -> Any:
    """JSON-safe number: NaN / inf -> None; numpy scalars -> Python."""
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _records(df: pl.DataFrame) -> list[dict[str, Any]]:
    return [{k: _finite(v) for k, v in row.items()} for row in df.to_dicts()]


# -- selection ---------------------------------------------------------------------------------
def build_selection(trace: Trace, layers: Sequence[int] | None, domains: Sequence[str] | None,
                    seed: int, sample_tokens: int, sample_requests: int = DEFAULT_SAMPLE_REQUESTS) -> Selection:
    """Check ``--layers`` / ``--domains`` against the trace and build the :class:`Selection`, with its
    request sample: the ``sample_requests`` selected requests of smallest hash of (seed, request id)."""
    model = trace.model
    moe = list(model.moe_layers)
    if layers is not None:
        if not layers:
            raise UsageError("--layers selects no layer")
        unknown = [x for x in layers if x not in moe]
        if unknown:
            raise UsageError(
                f"--layers: {', '.join(map(str, unknown))} "
                f"{'is not a MoE layer' if len(unknown) == 1 else 'are not MoE layers'} of this model "
                f"(MoE layers: {format_ranges(moe)})"
            )
        chosen = sorted(set(layers))
    else:
        chosen = moe
    requests = trace.requests().sort("request_id")
    names = sorted(set(requests["domain"].to_list()) | _load_domains(trace))
    if domains is not None:
        wanted = [d for d in dict.fromkeys(domains) if d]
        if not wanted:
            raise UsageError("--domains selects no domain; give names separated by commas, e.g. --domains code,math")
        unknown = [d for d in wanted if d not in names]
        if unknown:
            raise UsageError(
                f"--domains: no request has domain {', '.join(repr(d) for d in unknown)} "
                f"(domains in the trace: {', '.join(names) if names else 'none'})"
            )
        names = wanted
    index = {d: i for i, d in enumerate(names)}
    req_dom = np.array([index.get(d, -1) for d in requests["domain"].to_list()], np.int32)
    ids = requests["request_id"].to_numpy().astype(np.int64)
    return Selection(
        layers=chosen,
        domains=names,
        request_ids=ids,
        request_domain=req_dom,
        num_experts=model.num_experts,
        top_k=model.top_k,
        seed=seed,
        sample_tokens=sample_tokens,
        keep_unlisted=domains is None,
        sampled=pick_requests(ids, np.flatnonzero(req_dom >= 0), sample_requests, seed),
        model_layers=moe,
    )


def _load_domains(trace: Trace) -> set[str]:
    frame = trace.loads()
    if frame is None:
        return set()
    return set(frame.select(pl.col("domain").drop_nulls().unique()).collect()["domain"].to_list())


# -- the analysis ------------------------------------------------------------------------------
def analyze_trace(
    path: str | Path,
    *,
    layers: Sequence[int] | None = None,
    domains: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    seed: int = 0,
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
    sample_requests: int = DEFAULT_SAMPLE_REQUESTS,
    coactivation_tokens: int = co.DEFAULT_TOKENS,
    coactivation_tables: str = "top",
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    engine: Any = "local",
    address: str | None = None,
    verify_reads: bool = True,
    on_table: Callable[[str, pl.DataFrame], None] | None = None,
    on_step: Callable[[Analysis], None] | None = None,
) -> Analysis:
    """Compute every statistic of DESIGN.md "Statistics" for the trace at ``path``.

    ``progress(done, total)`` is called as row groups (on Ray: shards) finish. ``engine`` is
    ``"local"``, ``"ray"`` (with ``address``) or an :class:`~moeprof.analysis.engine.Engine`; the
    result does not depend on it. Raises :class:`UsageError` for a bad selection and
    :class:`AnalysisError` when the selection holds no routing at all. Every shard is checked against
    the manifest's sha256 as it is read (``verify_reads=False`` only for benchmarks).
    ``on_table(name, frame)`` is called as each table is done, while the other statistics run;
    ``on_step(analysis)`` with the analysis so far, each time statistics were added to it (from this
    thread; the report layer starts drawing the figures of those done).
    ``coactivation_tables``: ``"top"`` gives tables ``coactivation_pairs_top`` and ``transitions_top``
    (each expert's most frequent partners and next experts), ``"full"`` ``coactivation_pairs`` and
    ``transitions`` (every non-zero row; millions at DeepSeek-V3 shape); the summary is the same.
    """
    from moeprof.analysis.engine import get_engine

    eng = get_engine(engine, address, threads)
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UsageError("--batch-sizes: give positive integers, e.g. --batch-sizes 1,8,64,512,4096")
    if sample_tokens < 1:
        raise UsageError(f"--sample-tokens must be at least 1 (valid range: 1 and up), got {sample_tokens}")
    if isinstance(sample_requests, bool) or not isinstance(sample_requests, (int, np.integer)) or sample_requests < 1:
        raise UsageError(f"--sample-requests must be a whole number of at least 1, got {sample_requests!r} "
                         f"(default {DEFAULT_SAMPLE_REQUESTS}: requests whose own counts feed classification and "
                         "prefill->decode)")
    if coactivation_tokens < 1:
        raise UsageError(f"coactivation_tokens must be at least 1, got {coactivation_tokens}")
    if coactivation_tables not in co.TABLES:
        raise UsageError(f"--coactivation-tables must be one of {', '.join(co.TABLES)}, got {coactivation_tables!r}")
    trace = Trace.open(path, verify="rows", check_reads=verify_reads)
    sel = build_selection(trace, layers, domains, seed, sample_tokens, int(sample_requests))
    notes: list[str] = []
    # Step 1: one pass -> mergeable aggregates.
    if trace.num_routing_rows:
        units = row_groups(trace) if eng.name == "local" else trace.shard_paths("routing")
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(done[0], len(units))

        if eng.name == "local":
            agg = aggregate_routing(trace, sel, units=units, threads=threads, progress=tick)
        else:  # one task per shard, merged in a tree (moeprof.analysis.shards)
            from moeprof.analysis.shards import aggregate_shards

            agg = aggregate_shards(trace, sel, eng, progress=tick)
        if trace.loads() is not None:
            notes.append("the trace has both routing rows and count tables; statistics use the routing rows")
    elif trace.loads() is not None:
        agg = aggregate_loads(trace, sel)
    else:
        raise AnalysisError(f"{trace.path}: the trace holds no routing rows and no count tables; nothing to analyze")
    if agg.rows == 0 or agg.total().sum() == 0:
        what = f"domains {', '.join(sel.domains)}" if domains is not None else "the trace"
        raise AnalysisError(f"{trace.path}: no routing in the selected layers ({format_ranges(sel.layers)}) of {what}")
    # Step 2: layers without tokens: an error if asked for by name, otherwise left out with a note.
    routes = agg.total().sum(axis=1)
    empty = [sel.layers[i] for i in np.flatnonzero(routes == 0)]
    if empty:
        if layers is not None:
            have = [sel.layers[i] for i in np.flatnonzero(routes > 0)]
            raise AnalysisError(
                f"--layers: layer {', '.join(map(str, empty))} has no routed tokens in {trace.path} "
                f"(layers with tokens: {format_ranges(have)})"
            )
        notes.append(f"MoE layers {format_ranges(empty)} have no routed tokens in this trace and are left out")
    keep_l = np.flatnonzero(routes > 0)
    kept_layers = [sel.layers[i] for i in keep_l]

    a = Analysis(summary={}, tables=_Tables(on_table) if on_table is not None else {})
    s = a.summary
    caps = _capabilities(trace, agg)
    unlisted = agg.unlisted_routes
    if unlisted:
        notes.append(f"{unlisted:,} token-routes belong to requests not listed in requests.parquet: counted in "
                     "load statistics, left out of per-domain and per-request ones")
    s.update(
        summary_format=SUMMARY_FORMAT,
        moeprof_version=_own_version(),
        trace=_trace_info(trace, agg, sel, keep_l),
        selection=dict(layers=kept_layers, domains=sel.domains, batch_sizes=list(batch_sizes), seed=seed,
                       sample_tokens=sample_tokens, coactivation_tokens=coactivation_tokens,
                       sample_requests=int(sample_requests)),
        notes=notes,
        warnings=trace_warnings(trace),
    )
    # (S, 2, L, E) the request sample's counts; a view when no layer is left out (a copy costs 116 KiB
    # a request at DeepSeek-V3 shape).
    sampled = agg.sampled if keep_l.size == len(sel.layers) else agg.sampled[:, :, keep_l]
    total = agg.total()[keep_l]
    E, k = sel.num_experts, sel.top_k
    a.arrays.update(layers=kept_layers, load=total, num_experts=E, top_k=k)

    # Step 3: imbalance over the whole trace.
    agg_k = _sliced(agg, keep_l)
    per_layer = load.layer_imbalance(agg_k, caps["phase"] is None)
    a.tables["layer_imbalance"] = per_layer
    a.tables["expert_loads"] = load.expert_loads(agg_k)
    s["imbalance"] = _imbalance_summary(per_layer, total)
    step = on_step if on_step is not None else (lambda _a: None)
    step(a)

    # Steps 4-7 are independent but for the token matrix that 4 and 7 share (numpy releases the GIL
    # in their sorts and sums): run them at once, co-activation as soon as the token matrix is built.
    def token_step() -> tuple[np.ndarray | None, np.ndarray | None]:
        if not agg.per_token:
            return None, None
        tokens, dup = load.token_matrix(agg, sample_tokens if sample_tokens > 0 else 1 << 62)
        # every layer kept (nearly always): the matrix itself, not a copy (121 MB at 131,072 tokens x 58 layers)
        return (tokens if keep_l.size == tokens.shape[1] else tokens[:, keep_l]), dup

    def batch_step() -> dict:
        # Step 4: imbalance over batches of B tokens.
        if not agg.per_token:
            out = unavailable(caps["per_token"])
            if agg.windows is not None and agg.windows.shape[0] > 1:
                out["source_windows"] = load.window_imbalance(agg.windows[:, keep_l], kept_layers, seed)
            return out
        tokens, dup = token_job.result()
        if dup.any():
            why = caps["positions"] or "several routing rows share one (request, step, pos) in a layer"
            return unavailable(f"tokens cannot be told apart: {why}")
        pooled, by_layer = load.batch_imbalance(tokens, batch_sizes, E, kept_layers, seed)
        a.tables["batch_imbalance"] = by_layer
        a.tables["batch_imbalance_pooled"] = pooled
        return _batch_summary(pooled, agg, tokens.shape[0])

    def coactivation_step() -> dict:
        # Step 7: co-activation.
        tokens, dup = token_job.result()
        return _coactivation(a, tokens, dup, agg, caps, trace, kept_layers, coactivation_tokens, coactivation_tables,
                             pool)

    def shift_step() -> None:
        # Step 5: domain shift (classification runs on the pool).
        by_domain = agg.by_domain()[:, :, keep_l]  # (D, 2, L, E)
        dom_counts = by_domain.sum(axis=1)
        present = [i for i in range(len(sel.domains)) if dom_counts[i].sum() > 0]
        names = [sel.domains[i] for i in present]
        a.arrays.update(domains=names, domain_counts=dom_counts[present])
        if caps["domains"] is not None:
            s["domain_shift"] = unavailable(caps["domains"])
        elif len(present) < 2:
            s["domain_shift"] = unavailable(
                f"only one domain ({names[0] if names else 'none'}) has routed tokens in the selection; "
                "domain shift compares two or more"
            )
        else:
            shift = dom.pairwise_shift(dom_counts[present], names, kept_layers)
            experts = dom.domain_experts(dom_counts[present], names, kept_layers)
            a.tables["domain_shift"] = shift
            a.tables["domain_experts"] = experts
            s["domain_shift"] = _shift_summary(shift, experts, names)

    # As many threads as cores, up to 6 (5 steps and a second thread of co-activation counts): on two cores,
    # three threads at once (batch imbalance and two of co-activation counts) cost 1.1x the CPU, each evicting
    # the others' counts from the caches. Jobs wait only on jobs submitted before them (the token matrix) or
    # by them (co-activation's), so no thread waits on a job queued behind it.
    pool = ThreadPoolExecutor(max_workers=min(6, max(2, threads or os.cpu_count() or 2)), thread_name_prefix="moeprof-stats")
    with pool, one_blas_thread():
        token_job = pool.submit(token_step)
        class_job = pool.submit(_classification, a, agg, sampled, caps, sel, kept_layers, seed)
        phase_job = pool.submit(_prefill_decode, a, agg, sampled, caps, sel, kept_layers, seed, threads)
        co_job = pool.submit(coactivation_step)
        batch_job = pool.submit(batch_step)
        shift_step()  # here, while the pool runs (a few ms)
        step(a)
        # Each statistic joins the summary as it is done (co-activation before the pool shuts down: it
        # submits a job of its own).
        jobs = {batch_job: "batch_imbalance", class_job: "classification", phase_job: "prefill_decode",
                co_job: "coactivation"}
        while jobs:
            done, _ = wait(jobs, return_when=FIRST_COMPLETED)
            for job in done:
                s[jobs.pop(job)] = job.result()
            step(a)
    for key in ("batch_imbalance", "domain_shift", "classification", "prefill_decode", "coactivation"):
        s[key] = s.pop(key)  # summary.json in the order it always had
    return a


def one_blas_thread() -> Any:
    """BLAS on one thread while the statistics run side by side on a pool (their products are small).

    OpenBLAS's own threads spin for a while after each product, waiting for the next: on two cores
    that took the core the other statistics needed (measured: 0.3 s of CPU, 20%, of analyze at 10^6
    rows). Needs threadpoolctl; without it, BLAS keeps its default threads."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(1, user_api="blas")


def _own_version() -> str:
    from moeprof import __version__

    return __version__


def _sliced(agg: Aggregates, keep_l: np.ndarray) -> Aggregates:
    """The per-domain counts of ``agg`` in layers ``keep_l`` (what the whole-trace statistics read)."""
    sel = agg.selection
    sub = Selection(
        layers=[sel.layers[i] for i in keep_l], domains=sel.domains, request_ids=sel.request_ids,
        request_domain=sel.request_domain, num_experts=sel.num_experts, top_k=sel.top_k, seed=sel.seed,
        sample_tokens=sel.sample_tokens, sampled=sel.sampled,
    )
    out = Aggregates(selection=sub, domains=agg.domains[:, :, keep_l], sampled=agg.sampled[:0, :, keep_l],
                     seen=agg.seen, rows=agg.rows, per_token=agg.per_token)
    if agg.domain_extra is not None:
        out.domain_extra = agg.domain_extra[:, :, keep_l]
    return out


def _capabilities(trace: Trace, agg: Aggregates) -> dict[str, str | None]:
    """Why each family of statistics cannot be computed (None when it can)."""
    m = trace.manifest
    missing = m.missing
    src = m.source

    def miss(cap: str, default: str) -> str | None:
        return f"{default} ({cap}: {missing[cap]})" if cap in missing else None

    out: dict[str, str | None] = {}
    out["per_token"] = None if agg.per_token else (
        f"the trace holds count tables only (source {src!r}"
        + (f": {missing['per_token']}" if "per_token" in missing else "")
        + "); this statistic needs per-token routing rows"
    )
    ph_reason = miss("phase", "the trace does not record prefill/decode phase")
    if ph_reason is None and not agg.phases_seen.all():
        seen = [p for p, s in zip(("prefill", "decode"), agg.phases_seen) if s]
        ph_reason = f"the selection holds {' and '.join(seen) or 'no'} tokens only; it needs both prefill and decode"
    out["phase"] = ph_reason
    req_reason = miss("request_ids", "the trace does not record which request a token belongs to")
    if req_reason is None and agg.listed_routes == 0:
        req_reason = "no routed token belongs to a request listed in requests.parquet"
    out["requests"] = req_reason
    if len(agg.selection.domains) == 0:
        out["domains"] = "no request carries a domain label"
    else:
        out["domains"] = None
    out["positions"] = miss("positions", "the trace does not record token positions")
    return out


def _trace_info(trace: Trace, agg: Aggregates, sel: Selection, keep_l: np.ndarray) -> dict[str, Any]:
    m = trace.manifest
    total = agg.total()[keep_l]
    per_domain = {}
    req_has = agg.seen.any(axis=1)
    for i, d in enumerate(sel.domains):
        per_domain[d] = int((req_has & (sel.request_domain == i)).sum())
    return dict(
        path=str(trace.path),
        source=m.source,
        complete=m.complete,
        model=dict(name=m.model.name, num_experts=m.model.num_experts, top_k=m.model.top_k,
                   moe_layers=list(m.model.moe_layers)),
        per_token=agg.per_token,
        routing_rows=trace.num_routing_rows,
        rows_analyzed=int(agg.rows),
        token_routes=int(total.sum()),
        tokens=int(total.sum(axis=1).max() // sel.top_k) if total.size else 0,
        requests=int(req_has.sum()),
        requests_per_domain=per_domain,
        missing=dict(m.missing),
    )


def _imbalance_summary(per_layer: pl.DataFrame, total: np.ndarray) -> dict[str, Any]:
    worst = per_layer.sort("max_over_mean", descending=True, nulls_last=True).row(0, named=True)
    return dict(
        available=True,
        mean_max_over_mean=_finite(per_layer["max_over_mean"].mean()),
        worst_layer=dict(layer=int(worst["layer"]), max_over_mean=_finite(worst["max_over_mean"])),
        mean_cv=_finite(per_layer["cv"].mean()),
        mean_gini=_finite(per_layer["gini"].mean()),
        mean_entropy=_finite(per_layer["entropy"].mean()),
        dead_experts=int(per_layer["dead"].sum()),
        mean_hot_share=_finite(per_layer["hot_share"].mean()),
        per_layer=_records(per_layer),
    )


def _batch_summary(pooled: pl.DataFrame, agg: Aggregates, sample_tokens: int) -> dict[str, Any]:
    exact = agg.sample_fraction >= 1.0
    batches = []
    for row in pooled.to_dicts():
        if not row["batches"]:
            batches.append(dict(batch_size=row["batch_size"], batches=0, available=False,
                                reason=f"the sample holds {sample_tokens:,} tokens, fewer than one batch of "
                                       f"{row['batch_size']:,}"))
            continue
        batches.append(dict(
            batch_size=row["batch_size"], batches=row["batches"], available=True,
            median=_finite(row["median"]), median_ci=[_finite(row["median_lo"]), _finite(row["median_hi"])],
            p90=_finite(row["p90"]), p90_ci=[_finite(row["p90_lo"]), _finite(row["p90_hi"])],
        ))
    method = (
        "windows of B consecutive tokens over the trace's own forward passes (batch_id), passes in seeded random order"
        if agg.sample_key == "batch_id"
        else "windows of B tokens drawn at random (seeded) from the trace: it records no batch_id"
    )
    return dict(available=True, method=method, sample_tokens=sample_tokens, whole_trace=exact,
                statistic="max/mean per layer per batch; median and p90 over (batch, layer), 95% bootstrap CI over batches",
                batches=batches)


def _shift_summary(shift: pl.DataFrame, experts: pl.DataFrame, names: list[str]) -> dict[str, Any]:
    pairs = (
        shift.group_by(["domain_a", "domain_b"], maintain_order=True)
        .agg(js_mean=pl.col("js").mean(), js_max=pl.col("js").max(), jaccard_mean=pl.col("jaccard").mean())
    )
    spec = experts.filter(pl.col("specialist")).group_by("domain").agg(pl.len().alias("n"))
    spec_n = {r["domain"]: int(r["n"]) for r in spec.to_dicts()}
    top = (
        experts.filter(pl.col("specialist")).sort("lift", descending=True).head(10)
        .select(["domain", "layer", "expert", "lift", "share"])
    )
    return dict(
        available=True,
        domains=names,
        js_mean=_finite(shift["js"].mean()),
        jaccard_mean=_finite(shift["jaccard"].mean()),
        pairs=_records(pairs),
        specialist_lift=dom.SPECIALIST_LIFT,
        specialists_per_domain={d: spec_n.get(d, 0) for d in names},
        top_specialists=_records(top),
    )


def _request_sample(agg: Aggregates, used: int, in_trace: int, what: str) -> dict[str, Any]:
    """What share of the trace's requests a per-request statistic saw (the request sample)."""
    out: dict[str, Any] = dict(requests_in_trace=in_trace, whole_trace=bool(used == in_trace))
    if used != in_trace:
        out["sample_note"] = (f"{what} over a seeded sample of {used:,} of the trace's {in_trace:,} such requests "
                              "(bottom-k by hash of seed and request id); raise --sample-requests for more")
    return out


def _classification(a: Analysis, agg: Aggregates, sampled: np.ndarray, caps: dict, sel: Selection,
                    layers: list[int], seed: int) -> dict[str, Any]:
    for cap in ("requests", "phase", "domains"):
        if caps[cap] is not None:
            return unavailable(caps[cap])
    prefill = sampled[:, 0]  # (S, L, E) the request sample's prefill counts
    req_dom = sel.request_domain[sel.sampled]
    has = prefill.sum(axis=(1, 2)) > 0
    y = np.where(has, req_dom, -1)
    sizes = {sel.domains[d]: int((y == d).sum()) for d in range(len(sel.domains))}
    usable = [d for d, n in sizes.items() if n >= 2]
    in_trace = int((agg.seen[:, 0] & (sel.request_domain >= 0)).sum())
    if len(usable) < 2:
        where = "" if agg.whole_trace_requests else f" of the request sample ({len(sel.sampled):,} of the trace's requests; raise --sample-requests)"
        return unavailable(
            "needs at least two domains with two or more requests that have prefill tokens "
            f"(requests with prefill per domain{where}: {', '.join(f'{d} {n}' for d, n in sizes.items()) or 'none'})"
        )
    summary, per_layer = dom.classify(prefill, req_dom.copy(), sel.domains, layers, seed)
    a.tables["classification"] = per_layer
    return dict(available=True, **{k: _finite(v) if not isinstance(v, dict) else v for k, v in summary.items()},
                per_layer=_records(per_layer), requests=int((y >= 0).sum()),
                **_request_sample(agg, int((y >= 0).sum()), in_trace, "classified"))


def _prefill_decode(a: Analysis, agg: Aggregates, sampled: np.ndarray, caps: dict, sel: Selection,
                    layers: list[int], seed: int, threads: int | None = None) -> dict[str, Any]:
    for cap in ("requests", "phase"):
        if caps[cap] is not None:
            return unavailable(caps[cap])
    prefill, decode = sampled[:, 0], sampled[:, 1]  # (S, L, E) each: the request sample's counts
    both = (prefill.sum(axis=(1, 2)) > 0) & (decode.sum(axis=(1, 2)) > 0)
    if not both.any():
        if agg.seen.all(axis=1).any():
            return unavailable(f"no request of the request sample ({len(sel.sampled):,} of the trace's requests) has "
                               "both prefill and decode tokens in the selection; raise --sample-requests")
        return unavailable("no request has both prefill and decode tokens in the selection")
    idx = np.flatnonzero(both)
    req_dom = sel.request_domain[sel.sampled[idx]]
    k, E = sel.top_k, sel.num_experts
    ms = sorted({k, load.hot_count(E)})
    # the requests with both phases read a block at a time, never copied whole (S, L, E)
    per_layer, per_request = ph.correlations(prefill, decode, req_dom, layers, ms, seed, threads,
                                             rows=None if idx.size == both.size else idx)
    per_request = per_request.with_columns(
        pl.Series("request_id", sel.request_ids[sel.sampled[idx]][per_request["request"].to_numpy()])
    ).drop("request")
    a.tables["prefill_decode"] = per_layer
    a.tables["prefill_decode_requests"] = per_request.select(["request_id", "layer", "pearson", "spearman"])
    a.arrays["prefill_decode"] = per_layer
    n_req = int(idx.size)
    controls: dict[str, Any] = {}
    doms_present = np.unique(req_dom[req_dom >= 0])
    for name, ok, why in (
        ("same_domain", any((req_dom == d).sum() >= 2 for d in doms_present),
         "no domain has two requests with both prefill and decode tokens"
         + (" (the selection holds a single request)" if n_req == 1 else "")),
        ("other_domain", doms_present.size >= 2,
         "the requests with both prefill and decode tokens are all of one domain"
         + (" (the selection holds a single request)" if n_req == 1 else "")),
    ):
        if ok:
            controls[name] = dict(available=True, pearson=_finite(per_layer[f"{name}_pearson"].mean()),
                                  spearman=_finite(per_layer[f"{name}_spearman"].mean()))
        else:
            controls[name] = unavailable(why)
    in_trace = int(agg.seen.all(axis=1).sum())
    return dict(
        available=True,
        requests=n_req,
        pearson=_finite(per_layer["pearson"].mean()),
        spearman=_finite(per_layer["spearman"].mean()),
        aggregate_pearson=_finite(per_layer["aggregate_pearson"].mean()),
        aggregate_spearman=_finite(per_layer["aggregate_spearman"].mean()),
        controls=controls,
        recall={f"at_{m}": _finite(per_layer[f"recall_at_{m}"].mean()) for m in ms},
        note="pearson/spearman: mean over requests, then over layers; aggregate: per layer on counts summed over "
             "requests, then mean over layers",
        per_layer=_records(per_layer),
        **_request_sample(agg, n_req, in_trace, "correlations"),
    )


def _coactivation(a: Analysis, tokens: np.ndarray | None, dup: np.ndarray | None, agg: Aggregates, caps: dict,
                  trace: Trace, layers: list[int], max_tokens: int, tables: str = "top",
                  pool: ThreadPoolExecutor | None = None) -> dict[str, Any]:
    if tokens is None:
        return unavailable(caps["per_token"])
    E, k = agg.selection.num_experts, agg.selection.top_k
    exact = agg.sample_fraction >= 1.0 and tokens.shape[0] <= max_tokens
    tokens = tokens[:max_tokens]  # the sample is in random (hash) order: a prefix is a smaller sample
    out: dict[str, Any] = dict(available=True, tokens=int(tokens.shape[0]), whole_trace=bool(exact))
    if not exact:
        out["note"] = (f"counts over a seeded sample of {tokens.shape[0]:,} tokens of about "
                       f"{agg.tokens_estimate:,}; raise the sample size for more")
    if dup is not None and dup.any():
        return unavailable(f"tokens cannot be told apart: {caps['positions'] or 'several routing rows share one (request, step, pos) in a layer'}")
    steps = co.consecutive_pairs(layers, trace.model.moe_layers)
    # Loads, pairs and transitions in one pass over the layers, half of them on a thread of the pool.
    loads, pairs, trans = co.counts(tokens, steps, E, pool)
    tok_per_layer = loads.sum(axis=1) // k
    full = tables == "full"
    suffix = "" if full else "_top"
    # The top pairs by lift (the longest step here) on the pool while the tables are built on this thread:
    # by now the other statistics are mostly done and a core would wait.
    top_args = (pairs, loads, tok_per_layer, layers)
    top_job = pool.submit(co.top_by_lift, *top_args, min_count=co.TOP_MIN_COUNT) if pool is not None else None
    a.tables[f"coactivation_pairs{suffix}"] = co.pair_table(pairs, loads, tok_per_layer, layers,
                                                            keep=None if full else co.top_pairs(pairs))
    nonzero = co.nonzero_pairs(pairs)

    def pairs_summary() -> dict[str, Any]:
        top = top_job.result() if top_job is not None else co.top_by_lift(*top_args, min_count=co.TOP_MIN_COUNT)
        return dict(available=True, nonzero_pairs=nonzero, top_by_lift=_records(top), min_count_for_top=co.TOP_MIN_COUNT)

    if not steps:
        out["pairs"] = pairs_summary()
        out["transitions"] = unavailable("the selection holds no two consecutive MoE layers")
        return out
    from_counts = np.stack([loads[i] for i, _ in steps])
    conc = co.concentration(trans, from_counts)
    a.tables[f"transitions{suffix}"] = co.transition_table(trans, from_counts, steps, layers,
                                                           keep=None if full else co.most_frequent(trans))
    to_counts = np.stack([loads[j] for _, j in steps])
    # If the next expert were independent of e, max_e' P(e'|e) would be the next layer's top share.
    baseline = to_counts.max(axis=1) / np.maximum(to_counts.sum(axis=1) / k, 1)
    excess = conc - baseline
    best = int(np.nanargmax(excess)) if np.isfinite(excess).any() else 0
    a.arrays.update(transition_cond=co.conditional(trans[best], from_counts[best]), transition_pair=(layers[steps[best][0]], layers[steps[best][1]]),
                    transition_concentration=[(layers[i], layers[j], float(c), float(b))
                                              for (i, j), c, b in zip(steps, conc, baseline)])
    out["pairs"] = pairs_summary()
    out["transitions"] = dict(
        available=True,
        layer_pairs=len(steps),
        uniform_baseline=k / E,
        independent_baseline_mean=_finite(float(np.mean(baseline))),
        concentration_mean=_finite(float(np.nanmean(conc)) if np.isfinite(conc).any() else float("nan")),
        most_above_baseline=dict(layer=layers[steps[best][0]], next_layer=layers[steps[best][1]],
                                 concentration=_finite(conc[best]), independent_baseline=_finite(baseline[best])),
        definition=("P(e'|e) = tokens routed to e then e' / tokens routed to e; concentration = load-weighted mean of "
                    "max_e' P(e'|e); independent baseline = the next layer's largest share of tokens (what "
                    "concentration would be if the next expert did not depend on e)"),
        per_pair=[dict(layer=layers[i], next_layer=layers[j], concentration=_finite(c), independent_baseline=_finite(b))
                  for (i, j), c, b in zip(steps, conc, baseline)],
    )
    return out


# -- outputs -----------------------------------------------------------------------------------
def trace_warnings(trace: Trace) -> list[str]:
    """What the user must know before trusting any number of ``trace`` (an interrupted capture...)."""
    if trace.complete:
        return []
    return [f"{trace.path} is incomplete (manifest complete: false; the capture or import was interrupted): "
            f"every statistic covers only the {trace.num_routing_rows:,} rows it finished"]


# Something that writes more files of an analysis into its output directory and returns them (the
# report layer's plots): analysis never draws, the caller that wants figures passes their writer.
OutputWriter = Callable[[Analysis, Path], Sequence[Path]]


class TableEncoder:
    """Encodes tables to Parquet bytes on threads as the analysis adds them (``on_table``), so that
    encoding, which polars does off the GIL, runs beside the statistics still being computed rather
    than after them (measured: 0.45 s of CPU at DeepSeek-V3 shape, for the two co-activation tables).
    The bytes are those ``write_parquet`` writes to a file; a context manager, so that no encoding
    outlives a failed analysis."""

    def __init__(self, threads: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moeprof-tables")
        self._jobs: dict[str, Any] = {}

    def __call__(self, name: str, frame: pl.DataFrame) -> None:
        # A clone (no data copied) for the thread: polars 1.3, the oldest admitted, refuses a frame used by two threads
        # at once ("Already mutably borrowed"), and the statistics go on reading this one.
        self._jobs[name] = (frame, self._pool.submit(_parquet_bytes, frame.clone()))

    def encoded(self, name: str, frame: pl.DataFrame) -> bytes | None:
        """The bytes of table ``name`` if they were encoded from this very frame, else None."""
        frame_encoded, job = self._jobs.get(name, (None, None))
        return job.result() if frame_encoded is frame else None

    def __enter__(self) -> "TableEncoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _parquet_bytes(frame: pl.DataFrame) -> bytes:
    import io

    buf = io.BytesIO()
    frame.write_parquet(buf)
    return buf.getvalue()


def write_outputs(analysis: Analysis, out: Path, writers: Sequence[OutputWriter] = (),
                  encoder: TableEncoder | None = None) -> list[Path]:
    """Write ``summary.json``, one Parquet file per table and whatever ``writers`` write into ``out``;
    return the files. Tables that ``encoder`` encoded already are written from its bytes."""
    from moeprof.trace.manifest import write_json_atomic

    out = Path(out)
    files = []
    tables_dir = out / "tables"
    tables_dir.mkdir(exist_ok=True)
    for name, df in analysis.tables.items():
        path = tables_dir / f"{name}.parquet"
        data = encoder.encoded(name, df) if encoder is not None else None
        if data is None:
            df.write_parquet(path)
        else:
            path.write_bytes(data)
        files.append(path)
    for writer in writers:
        files += list(writer(analysis, out))
    analysis.summary["outputs"] = sorted(str(p.relative_to(out)) for p in files) + [SUMMARY_FILE]
    write_json_atomic(out / SUMMARY_FILE, analysis.summary)
    return files + [out / SUMMARY_FILE]


def analyze(
    path: str | Path,
    *,
    out: str | Path | None = None,
    force: bool = False,
    writers: Sequence[OutputWriter] = (),
    **options: Any,
) -> Analysis:
    """:func:`analyze_trace`, then (with ``out``) write the summary, tables and ``writers``' files there,
    whole or not at all (``out`` is checked before the analysis; ``force`` replaces only a moeprof output).
    Tables are encoded as the analysis produces them, and written once it is done."""
    from moeprof.outputs import check_target, refuse_overwriting_input, staged_dir

    if out is None:
        return analyze_trace(path, **options)
    refuse_overwriting_input(out, path, f"the trace being read ({path})")
    check_target(out, force)
    # A writer may start on the statistics done while the others are computed (the figures).
    prepares = [w.prepare for w in writers if callable(getattr(w, "prepare", None))]
    with TableEncoder() as encoder:
        analysis = analyze_trace(path, on_table=encoder, on_step=(lambda a: [p(a) for p in prepares]) if prepares else None,
                                 **options)
        with staged_dir(out, "analysis", force) as tmp:
            write_outputs(analysis, tmp, writers, encoder)
    return analysis


def summary_json(analysis: Analysis) -> str:
    return json.dumps(analysis.summary, indent=2)
