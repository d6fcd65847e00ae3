"""Placement over time, the engine: replay a trace's decode steps in order under static placements
and under periodic rebalancing, per pass and per layer (what :mod:`moeprof.placement.timeline`
summarises into windows, a table and a verdict).

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from moeprof.errors import PlacementError, UsageError
from moeprof.placement.data import RoutingData, signatures
from moeprof.placement.grouping import GroupingModel
from moeprof.placement.latency import ExpertShape, Hardware, comm_time, compute_time, migration_time
from moeprof.placement.policies import POLICIES
from moeprof.placement.run import fit_policy
from moeprof.placement.simulate import source_gpus
from moeprof.placement.topology import Topology
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


def _fit(rp: Replay, policy: str, lo: int, hi: int, src: np.ndarray,
         refine: bool = True) -> tuple[np.ndarray, GroupingModel | None, dict]:
    """Fit ``policy`` on the passes ``[lo, hi)``; returns ``phy2log``, the grouping model for the
    requests that arrive next (``None``: keep the random one) and notes."""
    counts, active = _window_counts(rp, lo, hi)
    if active.sum() == 0:
        raise PlacementError(f"no decode rows in passes {lo}..{hi - 1} to fit {policy} on; use a longer --window")
    data = dataclasses.replace(rp.data, decode=counts)
    p = fit_policy(data, active, rp.topo, policy, seed=rp.seed)
    info: dict[str, Any] = {}
    phy2log = p.phy2log
    if rp.rank_cost is not None and refine:
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
    same node that held it, else over the network. Returns counts, bytes and per-GPU received bytes.

    A copy that stays on its GPU moves nothing, as in vLLM, whose default policy receives the old
    ``physical_to_logical_map`` to keep such experts in place (``preserve_intragpu_slots``)."""
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
    R, L = data.num_requests, len(data.model.moe_layers)
    NG = topo.num_gpus
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
        phy2log, _, _ = _fit(rp, policy, 0, T, src, refine=False)
    keys = ("t_comm", "t_compute", "t_layer", "busiest", "mean_load", "cross_bytes", "intra_bytes", "tokens")
    per = {k: np.zeros(T) for k in keys}
    matrix = np.zeros((NG, NG))
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
                    # requests already in flight keep their GPU; the new ones are dealt over their node's GPUs
                    src = src.copy()
                    src[arriving] = source_gpus(node, topo)[arriving]
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
