"""The entry points behind ``moeprof place`` and ``moeprof simulate``: fit on the train split, score on
the held-out split, compare every policy. Everything is seeded; the split is by request."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moeprof.errors import PlacementError, UsageError
from moeprof.outputs import check_entries, staged_files
from moeprof.placement.data import RoutingData, load_routing, signatures, split_requests
from moeprof.placement.export import EXPORTERS, write_export
from moeprof.placement.grouping import GROUPINGS, fit_grouping
from moeprof.placement.plan import Placement, _jsonable, read_placement, write_placement
from moeprof.placement.policies import DEFAULT_GROUPING, FITS_ON_PREFILL, FitInput, get_policy
from moeprof.placement.sample import RequestSample, check_budget, check_sides, ids_digest, plan_sample
from moeprof.placement.simulate import SimConfig, simulate
from moeprof.placement.topology import Topology, build_topology
from moeprof.trace.reader import Trace

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "fp8": 1,
                "float8_e4m3fn": 1, "int8": 1}
DEFAULT_HIDDEN = 4096


def sim_config(data: RoutingData, *, hidden_size: int | None, dtype_bytes: int | None,
               batch_size: int | None = None) -> tuple[SimConfig, list[str]]:
    """Bytes per crossing from the options, else from the trace's model, else a stated default."""
    notes = []
    m = data.model
    if hidden_size is None:
        hidden_size = m.hidden_size
        if hidden_size is None:
            hidden_size = DEFAULT_HIDDEN
            notes.append(f"the trace does not record the hidden size; assumed {DEFAULT_HIDDEN} (pass --hidden-size)")
    if dtype_bytes is None:
        dtype_bytes = _DTYPE_BYTES.get(str(m.dtype or "").replace("torch.", "").lower(), 2)
    if hidden_size < 1 or dtype_bytes < 1:
        raise PlacementError("--hidden-size and --dtype-bytes must be at least 1")
    cfg = SimConfig(hidden_size=int(hidden_size), dtype_bytes=int(dtype_bytes))
    if batch_size is not None:
        if batch_size < 1:
            raise PlacementError(f"--batch-size must be at least 1, got {batch_size}")
        cfg = replace(cfg, batch_size=int(batch_size))
    return cfg, notes


def fit_policy(
    data: RoutingData,
    train: np.ndarray,
    topo: Topology,
    policy: str,
    *,
    grouping: str | None = None,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    engine: Any = None,
) -> Placement:
    """Fit ``policy`` on the requests where ``train[R]`` is true; return the placement (no metrics).
    ``engine`` (:mod:`moeprof.analysis.engine`) runs the K-means rounds of the fit; the placement does
    not depend on it."""
    fn = get_policy(policy)
    grouping = grouping or DEFAULT_GROUPING[policy]
    if grouping not in GROUPINGS:
        raise PlacementError(f"unknown grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
    params = dict(params or {})
    fit = FitInput(
        load=data.counts(data.phase)[train],
        prefill=data.prefill[train],
        domains=data.domains[train],
        topology=topo,
        seed=seed,
        engine=engine,
        total=data.train_total(train),
    )
    t0 = time.perf_counter()
    res = fn(fit, **params)
    seconds = time.perf_counter() - t0
    if grouping == "prefill" and res.grouping is not None:
        model = res.grouping
    else:
        sig = signatures(fit.prefill) if grouping == "prefill" else None
        model = fit_grouping(grouping, nodes=topo.nodes, seed=seed, train_domains=fit.domains,
                             train_prefill_sig=sig, train_node=res.train_node, engine=engine)
    m = data.model
    placement = Placement(
        topology=topo,
        policy=policy,
        moe_layers=list(m.moe_layers),
        phy2log=np.asarray(res.phy2log, dtype=np.int64),
        grouping=model,
        params=params,
        info=dict(res.info, fit_seconds=round(seconds, 4)),
        model=dict(name=m.name, num_experts=m.num_experts, top_k=m.top_k, num_layers=m.num_layers,
                   hidden_size=m.hidden_size),
    )
    placement.check()
    return placement


def score(data: RoutingData, placement: Placement, test: np.ndarray, cfg: SimConfig,
          train: np.ndarray | None = None, engine: Any = None) -> dict[str, Any]:
    """Simulate ``placement`` on the requests where ``test[R]`` is true; with ``train[R]``, also report
    the GPU load on those requests (``train_gpu_load_max_mean``) next to the held-out one. With an
    ``engine``, blocks of the scored rows are its tasks (the same metrics, bit for bit)."""
    idx = np.flatnonzero(test)
    sig = signatures(data.prefill[idx]) if placement.grouping.kind == "prefill" else None
    node_sel = placement.grouping.assign(domains=data.domains[idx], prefill_signatures=sig)
    node = np.zeros(data.num_requests, dtype=np.int64)
    node[idx] = node_sel
    rows = data.rows.subset(test)
    metrics = simulate(rows, placement.phy2log, placement.topology, node, cfg, engine=engine)
    if train is not None and train.any():
        # the same load measure on the requests the placement was fitted on: a bound that holds there
        # and not here did not generalise
        light = replace(cfg, capacity_batch_sizes=(), node_limits=())  # the load is all it needs
        metrics["train_gpu_load_max_mean"] = score(data, placement, train, light, engine=engine)["gpu_load_max_mean"]
    metrics["requests"] = int(len(idx))
    metrics["grouping"] = placement.grouping.kind
    metrics["phase"] = data.phase
    return metrics


def _check_model(data: RoutingData, placement: Placement, where: str) -> None:
    m = data.model
    if placement.topology.num_experts != m.num_experts or list(placement.moe_layers) != list(m.moe_layers):
        raise PlacementError(
            f"{where} was made for {placement.topology.num_experts} experts in layers {placement.moe_layers}, "
            f"the trace has {m.num_experts} experts in layers {list(m.moe_layers)}"
        )


def place(
    trace: str | Path,
    *,
    nodes: int,
    gpus_per_node: int,
    policy: str,
    out: str | Path,
    slots_per_gpu: int | None = None,
    redundant: int | None = None,
    grouping: str | None = None,
    exports: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    test_fraction: float = 0.3,
    phase: str = "decode",
    params: dict[str, Any] | None = None,
    hidden_size: int | None = None,
    dtype_bytes: int | None = None,
    force: bool = False,
    sample_requests: int | None = None,
    sample_rows: int | None = None,
    engine: Any = None,
) -> tuple[Placement, list[Path], list[str]]:
    """``moeprof place``: fit on the train split, simulate on the held-out split, write placement.json
    and the engine exports. Returns the placement, the files written and notes for the user.

    Only a request sample is read into this process (``sample_requests`` requests and ``sample_rows``
    token rows at most; :mod:`moeprof.placement.sample`), by one task per shard on ``engine``; the
    fit is on its train requests, the scores on its held-out ones, and ``placement.fit.sample``
    records it for ``simulate``."""
    get_policy(policy)
    check_budget(*_budget(sample_requests, sample_rows))
    engine = _engine(engine)
    for fmt in exports:
        if fmt not in EXPORTERS:
            raise PlacementError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORTERS)}")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give the file to write, e.g. {out / 'placement.json'}")
    names = [out.name] + [export_path(out, fmt).name for fmt in exports]
    check_entries(out.parent, names, force, shown=out)  # before the trace is read
    opened = Trace.open(trace)
    data = _load_split(opened, phase, seed, test_fraction, sample_requests, sample_rows, engine)
    topo = build_topology(data.model.num_experts, nodes, gpus_per_node, slots_per_gpu=slots_per_gpu,
                          redundant=redundant)
    test = data.held_out
    cfg, notes = sim_config(data, hidden_size=hidden_size, dtype_bytes=dtype_bytes)
    notes += sample_notes(data.sample, fit=policy == "eplb")
    placement = fit_policy(data, ~test, topo, policy, grouping=grouping, seed=seed, params=params, engine=engine)
    placement.fit = _fit_record(opened, data, test, seed, test_fraction)
    placement.metrics = score(data, placement, test, cfg, train=~test, engine=engine)
    for fmt in exports:  # an engine that cannot take this placement refuses it before anything is written
        EXPORTERS[fmt].build(placement)
    with staged_files(out.parent, names, force, kind="placement") as tmp:
        write_placement(placement, tmp / out.name)
        for fmt in exports:
            write_export(placement, fmt, tmp / export_path(out, fmt).name)
    written = [out] + [export_path(out, fmt) for fmt in exports]
    return placement, written, notes


def export_path(out: Path, fmt: str) -> Path:
    return out.with_name(out.stem + EXPORTERS[fmt].suffix)


def _fit_record(opened: Trace, data: RoutingData, test: np.ndarray, seed: int, test_fraction: float) -> dict:
    return dict(trace=str(opened.path), requests_sha256=data.requests_sha256, phase=data.phase,
                split_seed=int(seed), test_fraction=float(test_fraction),
                train_requests=int((~test).sum()), test_requests=int(test.sum()), sample=data.sample.record())


def _engine(engine: Any) -> Any:
    """The engine of a command: local threads by default, so that held-out rows are scored in blocks
    of ``SCORE_BLOCK_ROWS`` (bounded temporaries; the same metrics as one pass, bit for bit)."""
    from moeprof.analysis.engine import get_engine

    return get_engine(engine)


def _budget(sample_requests: int | None, sample_rows: int | None) -> tuple[int, int]:
    from moeprof.placement.sample import DEFAULT_SAMPLE_ROWS, default_sample_requests

    return (default_sample_requests() if sample_requests is None else sample_requests,
            DEFAULT_SAMPLE_ROWS if sample_rows is None else sample_rows)


def _load_split(opened: Trace, phase: str, seed: int, test_fraction: float, sample_requests: int | None,
                sample_rows: int | None, engine: Any) -> RoutingData:
    """The request sample of a fit (its split drawn over every request of the trace) and its data,
    with the splits' per-expert loads over every row."""
    max_requests, max_rows = check_budget(*_budget(sample_requests, sample_rows))
    sample = plan_sample(opened, phase=phase, seed=seed, held_out=lambda n: split_requests(n, test_fraction, seed),
                         max_requests=max_requests, max_rows=max_rows, engine=engine)
    check_sides(sample, test_fraction)
    return load_routing(opened, phase, engine=engine, sample=sample, totals=True)


def sample_notes(sample: RequestSample, fit: bool = True) -> list[str]:
    """What the user should know when the sample left requests out."""
    if sample.complete:
        return []
    rec = sample.record()
    return [f"a request sample: {rec['sampled_requests']:,} of the trace's {rec['requests_in_trace']:,} requests "
            f"({rec['train_requests']:,} train, {rec['test_requests']:,} held out; {rec['rows']:,} "
            f"token rows), bounded by {sample.limited_by} (--sample-requests {sample.max_requests}, --sample-rows "
            f"{sample.max_rows})" + ("; eplb fits on the load of every train request of the trace" if fit else "")
            + (f"; read {rec['shards_read']} of the {rec['shards_in_trace']} routing shards (by the request-id "
               "range the manifest records for each)" if rec.get("shards_read", 0) < rec.get("shards_in_trace", 0) else "")]


def simulate_placement(
    trace: str | Path,
    placement_path: str | Path,
    *,
    hidden_size: int | None = None,
    dtype_bytes: int | None = None,
    batch_size: int | None = None,
    engine: Any = None,
    sample_requests: int | None = None,
    sample_rows: int | None = None,
) -> tuple[Placement, dict[str, Any], list[str]]:
    """``moeprof simulate --placement``: score a placement on a trace's held-out requests (the same
    split as at fit time when it is the trace the placement was fitted on, else every request).
    ``engine`` (:mod:`moeprof.analysis.engine`) reads the shards and scores blocks of the held-out rows;
    the scores do not depend on it."""
    placement = read_placement(placement_path)
    opened = Trace.open(trace)
    engine = _engine(engine)
    fit = placement.fit
    phase = fit.get("phase", "decode")
    rec = fit.get("sample") or {}
    budget = list(_budget(sample_requests, sample_rows))
    check_budget(*budget)
    same = None
    for i, (option, given) in enumerate((("--sample-requests", sample_requests), ("--sample-rows", sample_rows))):
        key = "max_requests" if i == 0 else "max_rows"
        if given is None and key in rec:
            budget[i] = int(rec[key])  # by default the sample the placement was scored on at fit time
    seed = int(rec.get("seed", fit.get("split_seed", 0)))
    sample = plan_sample(opened, phase=phase, seed=seed, max_requests=budget[0], max_rows=budget[1], engine=engine)
    if fit.get("requests_sha256") == sample.requests_sha256:
        same = True
        for option, given, key in (("--sample-requests", sample_requests, "max_requests"),
                                   ("--sample-rows", sample_rows, "max_rows")):
            if given is not None and key in rec and int(given) != int(rec[key]):
                raise UsageError(
                    f"{option} {given}: {placement_path} was fitted and scored on this trace with {option} {rec[key]}; "
                    f"another budget draws other held-out requests than those `moeprof place` scored it on; "
                    f"leave {option} out (or give {rec[key]})")
        sample.held_out_all = split_requests(len(sample.request_ids), float(fit["test_fraction"]), int(fit["split_seed"]))
    data = load_routing(opened, phase, engine=engine, sample=sample)
    _check_model(data, placement, str(placement_path))
    cfg, notes = sim_config(data, hidden_size=hidden_size, dtype_bytes=dtype_bytes, batch_size=batch_size)
    if same:
        test = data.held_out
        if "test_ids_sha256" in rec and ids_digest(data.request_ids[test]) != rec["test_ids_sha256"]:
            raise PlacementError(
                f"{placement_path}: the held-out requests drawn now (--sample-requests {budget[0]}, --sample-rows "
                f"{budget[1]}) are not those the placement was scored on at fit time (fit.sample.test_ids_sha256); "
                "the trace's routing rows changed since: refit with `moeprof place`")
        notes.append(f"scored on the {int(test.sum())} held-out requests of the split the placement was fitted on")
        train = ~test
    else:
        test = np.ones(data.num_requests, dtype=bool)
        notes.append("the placement was fitted on another trace: every request of this one is held out")
        train = None
    notes += sample_notes(sample, fit=False)
    return placement, score(data, placement, test, cfg, train=train, engine=engine), notes


@dataclass
class Comparison:
    rows: list[dict[str, Any]] = field(default_factory=list)
    placements: dict[str, Placement] = field(default_factory=dict)
    topology: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dict(topology=self.topology, split=self.split, rows=self.rows, notes=self.notes))


COMPARE_RUNS: tuple[tuple[str, str | None], ...] = (
    ("linear", None), ("round_robin", None), ("eplb", None), ("kmeans", None), ("locality", None),
    ("locality", "domain"),
)
"""What ``--compare`` fits: every policy with its default grouping, and ``locality`` with the oracle
domain label as a reference for how much the prefill-based grouping leaves on the table."""


def compare(
    trace: str | Path,
    *,
    nodes: int,
    gpus_per_node: int,
    slots_per_gpu: int | None = None,
    redundant: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.3,
    phase: str = "decode",
    hidden_size: int | None = None,
    dtype_bytes: int | None = None,
    batch_size: int | None = None,
    runs: tuple[tuple[str, str | None], ...] = COMPARE_RUNS,
    engine: Any = None,
    sample_requests: int | None = None,
    sample_rows: int | None = None,
) -> Comparison:
    """``moeprof simulate --compare``: fit every policy on the train split, score all on the held-out split.

    With an ``engine`` (:mod:`moeprof.analysis.engine`), shards are read by its tasks; the policies are
    fitted here one after another, their K-means rounds and the scoring of blocks of held-out rows
    run as its tasks (the work that grows with the requests). Everything is seeded and every merge is
    in a fixed order or exact, so the table is the same as a local run's (bar the measured fit seconds)."""
    opened = Trace.open(trace)
    engine = _engine(engine)
    data = _load_split(opened, phase, seed, test_fraction, sample_requests, sample_rows, engine)
    topo = build_topology(data.model.num_experts, nodes, gpus_per_node, slots_per_gpu=slots_per_gpu,
                          redundant=redundant)
    test = data.held_out
    cfg, notes = sim_config(data, hidden_size=hidden_size, dtype_bytes=dtype_bytes, batch_size=batch_size)
    notes += sample_notes(data.sample)
    has_prefill = bool(data.prefill.any())
    cmp = Comparison(topology=topo.to_dict(), notes=notes,
                     split=_fit_record(opened, data, test, seed, test_fraction))
    todo = []
    for policy, grouping in runs:
        g = grouping or DEFAULT_GROUPING[policy]
        if g == "prefill" and not has_prefill:
            cmp.notes.append(f"{policy}: skipped, the trace has no prefill rows to group requests by")
            continue
        if policy in FITS_ON_PREFILL and not has_prefill:
            key = policy if grouping is None else f"{policy}+{grouping}"
            cmp.notes.append(f"{key}: skipped, {policy} fits on prefill routing and the trace has no prefill rows")
            continue
        todo.append((policy, grouping))
    fitted = [_fit_and_score(item, (data, test, topo, cfg, seed), engine) for item in todo]
    for (policy, grouping), p in zip(todo, fitted):
        g = grouping or DEFAULT_GROUPING[policy]
        p.fit = cmp.split
        key = policy if grouping is None else f"{policy}+{grouping}"
        cmp.placements[key] = p
        cmp.rows.append(dict(p.metrics, key=key, policy=policy, grouping=g,
                             fit_seconds=p.info.get("fit_seconds"), info=p.info))
    bound_row = next((r for r in cmp.rows if r["key"] == "locality"), None)
    if bound_row is not None:
        cmp.split["locality_load_bound"] = bound_row["info"].get("load_bound_per_layer_mean")
    return cmp


def _fit_and_score(item: tuple[str, str | None], shared: tuple, engine: Any = None) -> Placement:
    """One ``--compare`` run: fit ``item = (policy, grouping)`` on the train split, score the held-out one."""
    policy, grouping = item
    data, test, topo, cfg, seed = shared
    p = fit_policy(data, ~test, topo, policy, grouping=grouping, seed=seed, engine=engine)
    p.metrics = score(data, p, test, cfg, train=~test, engine=engine)
    return p


def write_comparison(cmp: Comparison, out: str | Path, *, force: bool = False,
                     plot: Callable[[dict[str, Any], Path], list[Path]] | None = None) -> list[Path]:
    """Write ``compare.json``, every fitted ``placement-<policy>.json`` and (with ``plot``, called as
    ``plot(compare_dict, stem)``) the figure into the directory ``out``, whole or not at all;
    ``force`` replaces only these files, and only where moeprof wrote them."""
    out = Path(out)
    names = ["compare.json"] + [f"placement-{key}.json" for key in cmp.placements]
    if plot is not None:
        names += ["compare.png", "compare.svg"]
    with staged_files(out, names, force, kind="comparison") as tmp:
        (tmp / "compare.json").write_text(json.dumps(_jsonable(cmp.to_dict()), indent=1) + "\n")
        for key, p in cmp.placements.items():
            write_placement(p, tmp / f"placement-{key}.json")
        if plot is not None:
            plot(cmp.to_dict(), tmp / "compare")
    return [out / name for name in names]
