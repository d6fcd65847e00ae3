"""Placement over time: replay a trace's decode steps in order under static placements and under
periodic rebalancing, and predict each schedule's MoE time per step, migrations included.

Glossary
    pass        one forward pass of the server (a decode step of every request in flight). From the
                trace's ``batch_id`` when it has one; otherwise requests enter in arrival order
                (``request_id``) into at most ``concurrency`` slots, as continuous batching does,
                and a request's i-th decode step runs i passes after it entered.
    schedule    when the placement changes. ``static``: never (the engine's start placement,
                ``linear``); ``once``: fitted on the first ``window`` passes, then held (an offline
                profile passed as ``--init-expert-location``); ``every N``: refitted every N passes on
                the last ``window`` passes.
    epoch       the passes between two placement changes.
    migration   expert weights copied at a rebalance: a slot whose expert changes needs the new
                expert's weights unless its GPU already held a copy (a local copy, no link crossed);
                they come over NVLink from a GPU of the same node that held it, else over the network.

The engines' schedules, as their source has them:

* SGLang (``python/sglang/srt/eplb/eplb_manager.py``): ``EPLBManager`` rebalances after every
  ``--eplb-rebalance-num-iterations`` forward passes (default 1000) from the expert distribution
  recorder's counts; ``server_args`` sets the recorder's buffer (the window) to that same number when
  it is not given, and the manager asserts the buffer is not longer than the interval. So
  ``every 1000, window 1000``, first at pass 1000.
* vLLM (``vllm/distributed/eplb/eplb_state.py``): ``EplbState.step`` writes each pass's load into a
  circular window of ``window_size`` passes (default 1000) and calls ``rearrange`` when
  ``expert_rearrangement_step`` reaches ``step_interval`` (default 3000); ``add_model`` starts that
  counter at ``step_interval - step_interval // 4``, so the first rearrangement comes after 750
  passes. ``every 3000, window 1000``, first at pass 750.

Both start from the linear placement. A schedule's time per decode step is the mean over passes of
``Σ_layers t_layer`` (see :mod:`moeprof.placement.latency`) plus its migrations at their steady-state
rate: the mean migration time (stop-the-world, as vLLM's synchronous mode) divided by the interval.
A trace is a sample of a server's life, often shorter than one interval of the engines' defaults, so
charging the migrations that fell inside it would overcharge long intervals. A placement fitted once
pays a one-time migration, reported beside the step time.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from moeprof.errors import PlacementError, UsageError
from moeprof.placement.data import RoutingData, load_routing, signatures
from moeprof.placement.grouping import GroupingModel
from moeprof.placement.latency import ExpertShape, Hardware, comm_time, compute_time, migration_time
from moeprof.placement.policies import POLICIES
from moeprof.placement.simulate import source_gpus
from moeprof.placement.topology import Topology, build_topology
from moeprof.placement.traffic import choose_slots, dispatch_hops, prefer_cheap_links, traffic_matrix
from moeprof.trace.reader import Trace

LOAD_FREE = ("linear", "round_robin")  # placements that do not look at load: rebalancing changes nothing
ENGINE_SCHEDULES = {"sglang": (1000, 1000, 1000), "vllm": (3000, 1000, 750)}  # every, window, first


@dataclass(frozen=True)
class Schedule:
    name: str
    every: int | None = None  # passes between rebalances; None: one rebalance (once) or none (static)
    window: int = 0
    first: int | None = None  # pass of the first rebalance; None: static

    def points(self, passes: int) -> list[int]:
        if self.first is None or self.first >= passes:
            return []
        if self.every is None:
            return [self.first]
        return list(range(self.first, passes, self.every))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def schedules(passes: int, every: list[int] | None, window: int | None, engines: bool = True) -> list[Schedule]:
    """``static``, ``once`` and ``every N`` for each N (default: a 16th, an 8th and a quarter of the
    trace), each with ``window`` (default: N, SGLang's rule), plus the engines' own schedules when the
    trace is long enough for them to rebalance at least once."""
    if every is None:
        every = sorted({max(1, passes // d) for d in (16, 8, 4)})
    for n in every:
        if n < 1:
            raise UsageError(f"--rebalance-every must be at least 1, got {n}")
    if window is not None and window < 1:
        raise UsageError(f"--window must be at least 1, got {window}")
    once_w = window or max(1, min(every))
    out = [Schedule("static"), Schedule(f"once after {once_w}", None, once_w, once_w)]
    for n in every:
        w = window or n
        out.append(Schedule(f"every {n}", n, w, n))
    if engines:
        for name, (n, w, first) in ENGINE_SCHEDULES.items():
            if first < passes:
                out.append(Schedule(f"{name} (every {n}" + (f", w {w})" if w != n else ")"), n, w, first))
    return out


# -- time order -------------------------------------------------------------------------------------
def pass_of_rows(trace: Trace, data: RoutingData, concurrency: int) -> tuple[np.ndarray, str]:
    """``[n]`` pass of every decode row of ``data.rows`` (dense, from 0) and how it was found."""
    rows = data.rows
    R = data.num_requests
    frame = (trace.routing(["request_id", "step", "phase", "batch_id"])
             .filter(pl.col("phase").cast(pl.String) == data.phase)
             .group_by(["request_id", "step"]).agg(pl.col("batch_id").min())
             .collect())
    if frame.height and frame["batch_id"].null_count() == 0:
        r = np.searchsorted(data.request_ids, frame["request_id"].to_numpy())
        key = r.astype(np.int64) * (int(rows.step.max(initial=0)) + 1) + frame["step"].to_numpy()
        order = np.argsort(key)
        rkey = rows.request * (int(rows.step.max(initial=0)) + 1) + rows.step
        at = np.searchsorted(key[order], rkey)
        batch = frame["batch_id"].to_numpy()[order][at]
        _, dense = np.unique(batch, return_inverse=True)
        return dense.astype(np.int64), "the trace's batch_id (one pass per forward pass recorded)"
    if concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {concurrency}")
    first = np.full(R, np.iinfo(np.int64).max)
    last = np.full(R, -1)
    np.minimum.at(first, rows.request, rows.step)
    np.maximum.at(last, rows.request, rows.step)
    start = np.zeros(R, dtype=np.int64)
    free = [0] * min(concurrency, max(R, 1))
    heapq.heapify(free)
    for r in range(R):  # requests sorted by request_id: arrival order
        if last[r] < 0:
            continue
        t = heapq.heappop(free)
        start[r] = t
        heapq.heappush(free, t + int(last[r] - first[r]) + 1)
    return start[rows.request] + rows.step - first[rows.request], (
        f"no batch_id in the trace: requests enter in request_id order, at most {concurrency} at a time "
        "(--concurrency)")


# -- one schedule -----------------------------------------------------------------------------------
@dataclass
class Replay:
    """Everything a schedule run needs that does not depend on the schedule."""

    data: RoutingData
    topo: Topology
    shape: ExpertShape
    hw: Hardware
    passes: np.ndarray  # [n] pass of each decode row
    num_passes: int
    arrival: np.ndarray  # [R] first pass of each request
    seed: int = 0
    report_every: int = 1
    rank_cost: np.ndarray | None = None
    time_note: str = ""


@dataclass
class Run:
    policy: str
    schedule: Schedule
    per_pass: dict[str, np.ndarray] = field(default_factory=dict)
    rebalances: list[dict[str, Any]] = field(default_factory=list)
    matrix: np.ndarray | None = None  # [NG, NG] bytes per token
    notes: list[str] = field(default_factory=list)

    @property
    def moe_seconds(self) -> float:
        return float(self.per_pass["t_layer"].sum())

    @property
    def migration_seconds(self) -> float:
        return float(sum(r["seconds"] for r in self.rebalances))

    def us_per_step(self) -> float:
        return (self.moe_seconds + self.migration_seconds) / len(self.per_pass["t_layer"]) * 1e6


def _window_counts(rp: Replay, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """``[R, L, E]`` token-routes of the passes ``[lo, hi)`` per request, and ``[R]`` which requests have any."""
    rows = rp.data.rows
    R, L, E = rp.data.num_requests, len(rp.data.model.moe_layers), rp.topo.num_experts
    m = (rp.passes >= lo) & (rp.passes < hi)
    idx = ((rows.request[m] * L + rows.layer[m])[:, None] * E + rows.experts[m]).ravel()
    counts = np.bincount(idx, minlength=R * L * E).reshape(R, L, E)
    return counts, counts.reshape(R, -1).sum(1) > 0


def _fit(rp: Replay, policy: str, lo: int, hi: int, src: np.ndarray) -> tuple[np.ndarray, GroupingModel | None, dict]:
    """Fit ``policy`` on the passes ``[lo, hi)``; returns ``phy2log``, the grouping model for the
    requests that arrive next (``None``: keep the random one) and notes."""
    from moeprof.placement.run import fit_policy  # run imports this module

    counts, active = _window_counts(rp, lo, hi)
    if active.sum() == 0:
        raise PlacementError(f"no decode rows in passes {lo}..{hi - 1} to fit {policy} on; use a longer --window")
    data = dataclasses.replace(rp.data, decode=counts)
    p = fit_policy(data, active, rp.topo, policy, seed=rp.seed)
    info: dict[str, Any] = {}
    phy2log = p.phy2log
    if rp.rank_cost is not None:
        rows = rp.data.rows
        m = (rp.passes >= lo) & (rp.passes < hi)
        L, E, NG = phy2log.shape[0], rp.topo.num_experts, rp.topo.num_gpus
        idx = ((src[rows.request[m]] * L + rows.layer[m])[:, None] * E + rows.experts[m]).ravel()
        src_counts = np.bincount(idx, minlength=NG * L * E).reshape(NG, L, E)
        phy2log, info = prefer_cheap_links(phy2log, src_counts, rp.rank_cost, rp.topo)
    grouping = None if p.grouping.kind == "random" else p.grouping
    return phy2log, grouping, info


def migration(old: np.ndarray, new: np.ndarray, topo: Topology, expert_bytes: int) -> dict[str, Any]:
    """Weights moved from placement ``old[L, P]`` to ``new[L, P]``: per slot whose expert changes
    and whose GPU held no copy of the new expert, one expert's bytes, over NVLink from a GPU of the
    same node that held it, else over the network. Returns counts, bytes and per-GPU received bytes."""
    L, P = old.shape
    S, G, NG, E = topo.slots_per_gpu, topo.gpus_per_node, topo.num_gpus, topo.num_experts
    gpu_of = np.arange(P) // S
    held_gpu = np.zeros((L, NG, E), dtype=bool)
    held_node = np.zeros((L, topo.nodes, E), dtype=bool)
    lay = np.repeat(np.arange(L), P)
    held_gpu[lay, np.tile(gpu_of, L), old.ravel()] = True
    held_node[lay, np.tile(gpu_of // G, L), old.ravel()] = True
    # one transfer per (layer, GPU, expert) newly needed, however many slots of the GPU take it
    need = np.zeros((L, NG, E), dtype=bool)
    need[lay, np.tile(gpu_of, L), new.ravel()] = True
    need &= ~held_gpu
    l_idx, g_idx, e_idx = np.nonzero(need)
    nvl = held_node[l_idx, g_idx // G, e_idx]
    recv_nvl = np.bincount(g_idx[nvl], minlength=NG) * float(expert_bytes)
    recv_net = np.bincount(g_idx[~nvl], minlength=NG) * float(expert_bytes)
    moved = int(len(g_idx))
    return dict(experts_moved=moved, bytes=moved * int(expert_bytes), nvlink_bytes=int(nvl.sum()) * int(expert_bytes),
                network_bytes=int((~nvl).sum()) * int(expert_bytes), recv_net=recv_net, recv_nvl=recv_nvl)


def replay(rp: Replay, policy: str, schedule: Schedule) -> Run:
    """Replay every decode pass under ``policy`` rebalanced on ``schedule``."""
    if policy not in POLICIES:
        raise PlacementError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    data, topo = rp.data, rp.topo
    rows = data.rows
    R, L = data.num_requests, len(data.model.moe_layers)
    NG, S = topo.num_gpus, topo.slots_per_gpu
    T = rp.num_passes
    run = Run(policy, schedule)
    linear = np.tile(np.arange(topo.num_slots) % topo.num_experts, (L, 1))
    # requests keep the node they were given when they arrived; the random grouping deals them out
    # once, seeded, so that every schedule sees the same assignment until a policy's grouping takes over
    node = np.random.default_rng(rp.seed).permutation(R) % topo.nodes
    src = source_gpus(node, topo)
    bounds = [0] + ([p for p in schedule.points(T)] if policy not in LOAD_FREE else []) + [T]
    phy2log = linear
    if policy in LOAD_FREE and policy != "linear":
        phy2log, _, _ = _fit(rp, policy, 0, T, src)
    keys = ("t_comm", "t_compute", "t_layer", "busiest", "mean_load", "cross_bytes", "intra_bytes", "tokens")
    per = {k: np.zeros(T) for k in keys}
    matrix = np.zeros((NG, NG))
    hop_bytes = rp.shape.hop_bytes
    for i in range(len(bounds) - 1):
        lo, hi = bounds[i], bounds[i + 1]
        if i > 0:
            new, grouping, info = _fit(rp, policy, max(0, lo - schedule.window), lo, src)
            mig = migration(phy2log, new, topo, rp.shape.expert_bytes)
            seconds = migration_time(mig.pop("recv_net"), mig.pop("recv_nvl"), rp.hw)
            run.rebalances.append(dict(mig, at_pass=lo, window=[max(0, lo - schedule.window), lo], seconds=seconds,
                                       **({"rank_cost": info} if info else {})))
            phy2log = new
            if grouping is not None:
                arriving = np.flatnonzero((rp.arrival >= lo) & (rp.arrival < hi))
                if len(arriving):
                    sig = signatures(data.prefill[arriving]) if grouping.kind == "prefill" else None
                    node[arriving] = grouping.assign(domains=data.domains[arriving], prefill_signatures=sig)
                    src = source_gpus(node, topo)
        m = np.flatnonzero((rp.passes >= lo) & (rp.passes < hi))
        if not len(m):
            continue
        _accumulate(rp, phy2log, m, src, lo, hi, per, matrix)
    per["tokens"] /= L
    run.per_pass = per
    run.matrix = matrix / max(per["tokens"].sum(), 1)
    return run


def _accumulate(rp: Replay, phy2log: np.ndarray, m: np.ndarray, src_of_request: np.ndarray, lo: int, hi: int,
                per: dict[str, np.ndarray], matrix: np.ndarray) -> None:
    """Add the passes ``[lo, hi)`` (rows ``m``) under ``phy2log`` to the per-pass figures."""
    rows, topo, L = rp.data.rows, rp.topo, len(rp.data.model.moe_layers)
    NG, S = topo.num_gpus, topo.slots_per_gpu
    n_pass = hi - lo
    layer, t = rows.layer[m], rp.passes[m] - lo
    src = src_of_request[rows.request[m]]
    slot = choose_slots(phy2log, topo, layer, src, rows.experts[m], rows.token[m])
    gpu = slot // S
    cell = t * L + layer  # [n] (pass, layer)
    routes = np.bincount((cell[:, None] * NG + gpu).ravel(), minlength=n_pass * L * NG).reshape(n_pass, L, NG)
    # expert copies with at least one token, per (pass, layer, GPU)
    used = np.unique((cell[:, None] * topo.num_slots + slot).ravel())
    active = np.bincount((used // topo.num_slots) * NG + (used % topo.num_slots) // S,
                         minlength=n_pass * L * NG).reshape(n_pass, L, NG)
    hops = dispatch_hops(src, gpu, topo)
    hb = float(rp.shape.hop_bytes)

    def per_gpu(who: np.ndarray, sel: np.ndarray) -> np.ndarray:
        return np.bincount(cell[hops.row[sel]] * NG + who[sel], minlength=n_pass * L * NG).reshape(n_pass, L, NG) * hb

    net, nvl = hops.network, ~hops.network
    t_disp = comm_time(per_gpu(hops.a, net), per_gpu(hops.b, net), per_gpu(hops.a, nvl), per_gpu(hops.b, nvl), rp.hw)
    t_comp = compute_time(routes, active, rp.shape, rp.hw)  # [n_pass, L]
    sl = slice(lo, hi)
    per["t_comm"][sl] += 2 * t_disp.sum(1)
    per["t_compute"][sl] += t_comp.sum(1)
    per["t_layer"][sl] += (2 * t_disp + t_comp).sum(1)
    per["busiest"][sl] += routes.max(2).sum(1) / L
    per["mean_load"][sl] += routes.mean(2).sum(1) / L
    hop_pass = t[hops.row]
    per["cross_bytes"][sl] += np.bincount(hop_pass[net], minlength=n_pass) * 2 * hb
    per["intra_bytes"][sl] += np.bincount(hop_pass[nvl], minlength=n_pass) * 2 * hb
    per["tokens"][sl] += np.bincount(t, minlength=n_pass)  # token-layers; divided by L below
    matrix += traffic_matrix(hops, NG, hb, 1)


# -- the whole comparison ---------------------------------------------------------------------------
def expert_shape(trace: Trace, data: RoutingData, *, hidden_size: int | None, dtype_bytes: int | None,
                 moe_intermediate_size: int | None, weight_bytes: int | None) -> tuple[ExpertShape, list[str]]:
    """The expert's dimensions: options first, then the manifest (``model.moe_intermediate_size``, or
    the ``config.json`` of the model the capture names), else an error saying which option to pass."""
    from moeprof.placement.run import sim_config

    cfg, notes = sim_config(data, hidden_size=hidden_size, dtype_bytes=dtype_bytes)
    inter = moe_intermediate_size
    if inter is None:
        raw = json.loads((trace.path / "manifest.json").read_text())
        inter = (raw.get("model") or {}).get("moe_intermediate_size")
        model_dir = (raw.get("capture") or {}).get("model")
        if inter is None and isinstance(model_dir, str):
            for base in (Path.cwd(), trace.path.parent, trace.path.parent.parent):
                cfg_file = base / model_dir / "config.json"
                if cfg_file.is_file():
                    try:
                        inter = json.loads(cfg_file.read_text()).get("moe_intermediate_size")
                    except (OSError, json.JSONDecodeError):
                        inter = None
                    if inter:
                        notes.append(f"moe_intermediate_size {inter} from {cfg_file}")
                        break
    if inter is None:
        raise UsageError(
            f"{trace.path}: the manifest does not record the experts' intermediate size; pass "
            "--moe-intermediate-size (e.g. 8192 for Llama-4-Maverick, 2048 for DeepSeek-V3)")
    if int(inter) < 1 or (weight_bytes is not None and weight_bytes < 1):
        raise UsageError("--moe-intermediate-size and --weight-bytes must be at least 1")
    wb = int(weight_bytes or cfg.dtype_bytes)
    return ExpertShape(cfg.hidden_size, int(inter), cfg.dtype_bytes, wb), notes


def summarize(run: Run, rp: Replay) -> dict[str, Any]:
    """Per-window and whole-trace figures of one run."""
    per, L = run.per_pass, len(rp.data.model.moe_layers)
    T = len(per["t_layer"])
    windows = []
    for lo in range(0, T, rp.report_every):
        hi = min(T, lo + rp.report_every)
        sl = slice(lo, hi)
        tok = per["tokens"][sl].sum()
        moved = [r for r in run.rebalances if lo <= r["at_pass"] < hi]
        windows.append(dict(
            start=lo, end=hi, tokens=int(tok),
            busiest_load=float(per["busiest"][sl].mean()),
            load_max_mean=_ratio(per["busiest"][sl].sum(), per["mean_load"][sl].sum()),
            cross_node_bytes=float(per["cross_bytes"][sl].sum()),
            cross_node_bytes_per_token=_ratio(per["cross_bytes"][sl].sum(), tok),
            intra_node_bytes_per_token=_ratio(per["intra_bytes"][sl].sum(), tok),
            moe_us_per_step=float(per["t_layer"][sl].mean() * 1e6),
            comm_share=_ratio(per["t_comm"][sl].sum(), per["t_layer"][sl].sum()),
            migration_bytes=int(sum(r["bytes"] for r in moved)),
        ))
    tokens = per["tokens"].sum()
    moe = float(per["t_layer"].sum())
    mig = run.migration_seconds
    # Migration at its steady-state rate: a periodic schedule pays its mean rebalance every `every`
    # passes however long the trace is; a placement fitted once pays once, which a server amortises
    # over its whole life, so it is reported beside the step time, not in it.
    n_reb = len(run.rebalances)
    periodic = run.schedule.every is not None and n_reb > 0
    mig_step = mig / n_reb / run.schedule.every if periodic else 0.0
    return dict(
        key=f"{run.policy} · {run.schedule.name}" if run.policy not in LOAD_FREE else f"{run.policy} · static",
        policy=run.policy, schedule=run.schedule.to_dict(), passes=T, tokens=int(tokens),
        us_per_step=(moe / T + mig_step) * 1e6,
        moe_us_per_step=moe / T * 1e6,
        moe_layer_us=moe / T / L * 1e6,
        comm_us_per_step=float(per["t_comm"].sum()) / T * 1e6,
        compute_us_per_step=float(per["t_compute"].sum()) / T * 1e6,
        comm_share=_ratio(per["t_comm"].sum(), per["t_layer"].sum()),
        migration_us_per_step=mig_step * 1e6,
        migration_one_time_s=0.0 if periodic else mig,
        cross_node_bytes_per_token=_ratio(per["cross_bytes"].sum(), tokens),
        intra_node_bytes_per_token=_ratio(per["intra_bytes"].sum(), tokens),
        busiest_load=float(per["busiest"].mean()),
        load_max_mean=_ratio(per["busiest"].sum(), per["mean_load"].sum()),
        rebalances=len(run.rebalances),
        experts_moved=int(sum(r["experts_moved"] for r in run.rebalances)),
        migration_bytes=int(sum(r["bytes"] for r in run.rebalances)),
        migration_network_bytes=int(sum(r["network_bytes"] for r in run.rebalances)),
        migration_seconds=mig,
        rebalance_points=[dict(at_pass=r["at_pass"], experts_moved=r["experts_moved"], bytes=r["bytes"],
                               us=r["seconds"] * 1e6) for r in run.rebalances],
        windows=windows,
        notes=run.notes,
    )


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def timeline(
    trace: str | Path,
    *,
    nodes: int,
    gpus_per_node: int,
    hw: Hardware,
    policies: list[str] | tuple[str, ...] = ("linear", "eplb"),
    every: list[int] | None = None,
    window: int | None = None,
    slots_per_gpu: int | None = None,
    redundant: int | None = None,
    concurrency: int = 64,
    report_windows: int = 20,
    hidden_size: int | None = None,
    dtype_bytes: int | None = None,
    moe_intermediate_size: int | None = None,
    weight_bytes: int | None = None,
    rank_cost: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """``moeprof simulate --timeline``: every policy under every schedule, the verdict, the traffic
    matrices of the default and of the winner. Plain data (JSON-ready) out."""
    from moeprof.placement.traffic import load_rank_cost_matrix

    for p in policies:
        if p not in POLICIES:
            raise UsageError(f"--policies: unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    if report_windows < 1:
        raise UsageError(f"--report-windows must be at least 1, got {report_windows}")
    opened = Trace.open(trace)
    data = load_routing(opened, "decode")
    if data.rows.num_tokens == 0:
        raise PlacementError(f"{opened.path}: no decode rows to replay; --timeline needs decode steps")
    topo = build_topology(data.model.num_experts, nodes, gpus_per_node, slots_per_gpu=slots_per_gpu,
                          redundant=redundant)
    shape, notes = expert_shape(opened, data, hidden_size=hidden_size, dtype_bytes=dtype_bytes,
                                moe_intermediate_size=moe_intermediate_size, weight_bytes=weight_bytes)
    passes, how = pass_of_rows(opened, data, concurrency)
    T = int(passes.max()) + 1
    arrival = np.full(data.num_requests, T)
    np.minimum.at(arrival, data.rows.request, passes)
    cost = load_rank_cost_matrix(rank_cost, topo.num_gpus) if rank_cost is not None else None
    rp = Replay(data, topo, shape, hw, passes, T, arrival, seed=seed,
                report_every=max(1, -(-T // report_windows)), rank_cost=cost, time_note=how)
    plan = schedules(T, every, window)
    runs: list[Run] = [replay(rp, "linear", plan[0])]
    for p in policies:
        if p == "linear":
            continue
        for sch in ([plan[0]] if p in LOAD_FREE else plan[1:]):
            runs.append(replay(rp, p, sch))
    rows = [summarize(r, rp) for r in runs]
    base = rows[0]
    for r in rows:
        r["vs_default"] = dict(
            step_time=_ratio(r["us_per_step"], base["us_per_step"]) - 1,
            comm_time=_ratio(r["comm_us_per_step"], base["comm_us_per_step"]) - 1,
            cross_node_bytes=_ratio(r["cross_node_bytes_per_token"], base["cross_node_bytes_per_token"]) - 1,
        )
    best_i = int(np.argmin([r["us_per_step"] for r in rows]))
    matrices = {rows[0]["key"]: runs[0].matrix}
    if best_i:
        matrices[rows[best_i]["key"]] = runs[best_i].matrix
    return dict(
        trace=str(opened.path), model=data.model.name, topology=topo.to_dict(),
        hardware=hw.to_dict(), expert=dict(dataclasses.asdict(shape), expert_bytes=shape.expert_bytes),
        passes=T, tokens=int(data.rows.num_tokens), moe_layers=len(data.model.moe_layers),
        time_order=how, report_every=rp.report_every,
        rank_cost=str(rank_cost) if rank_cost is not None else None,
        rows=rows, best=rows[best_i]["key"], verdict=verdict(rows, best_i, topo),
        traffic_matrices={k: m.tolist() for k, m in matrices.items()},
        notes=notes,
    )


def verdict(rows: list[dict[str, Any]], best_i: int, topo: Topology) -> str:
    """One sentence: the fastest policy and schedule against the engine default."""
    base, best = rows[0], rows[best_i]
    where = f"{topo.nodes} × {topo.gpus_per_node} GPUs"
    if best_i == 0:
        runner = min(rows[1:], key=lambda r: r["us_per_step"], default=None)
        tail = (f"; the closest alternative, {runner['key']}, is {runner['vs_default']['step_time']:+.1%}"
                if runner else "")
        return (f"On this trace and {where}, the engine default (linear, no EPLB) gives the lowest predicted "
                f"MoE time per decode step, {base['us_per_step']:.4g} µs{tail}.")
    n = best["rebalances"]
    if not n:
        mig = ""
    elif best["schedule"]["every"] is None:
        mig = (f", plus a one-time migration of {best['experts_moved']} experts ({_human(best['migration_bytes'])}, "
               f"{best['migration_one_time_s']:.3g} s)")
    else:
        mig = (f", counting its rebalances' weight traffic ({best['experts_moved'] / n:.0f} experts, "
               f"{_human(best['migration_bytes'] / n)} every {best['schedule']['every']} passes on average: "
               f"{best['migration_us_per_step']:.3g} µs per step)")
    return (f"On this trace and {where}, {best['key']} gives the lowest predicted MoE time per decode step: "
            f"{best['us_per_step']:.4g} µs against {base['us_per_step']:.4g} µs for the engine default "
            f"(linear, no EPLB), {best['vs_default']['step_time']:+.1%}{mig}.")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_timeline_out(out: str | Path, force: bool) -> Path:
    """Refuse to replace an earlier timeline in ``out`` unless ``force``; nothing is written here."""
    from moeprof.errors import OutputExistsError

    out = Path(out)
    if out.exists() and any(out.glob("timeline.*")) and not force:
        raise OutputExistsError(f"{out} already holds a timeline; pass --force to replace it")
    return out


def write_timeline(d: dict[str, Any], out: str | Path, *, force: bool = False) -> Path:
    """Write ``timeline.json`` into the directory ``out`` (atomically)."""
    from moeprof.placement.plan import _jsonable

    out = check_timeline_out(out, force)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "timeline.json"
    tmp = out / "timeline.json.tmp"
    tmp.write_text(json.dumps(_jsonable(d), indent=1) + "\n")
    tmp.replace(path)
    return path
