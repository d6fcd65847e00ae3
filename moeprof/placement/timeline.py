"""``moeprof simulate --timeline``: every policy under every schedule (see
:mod:`moeprof.placement.replay` for the replay, the schedules and the engines' own), summarised per
window and over the trace, and the verdict: which policy and rebalancing interval gives the lowest
predicted MoE time per decode step, against the engine default (linear, no EPLB)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.errors import PlacementError, UsageError
from moeprof.placement.data import RoutingData, load_routing
from moeprof.placement.latency import ExpertShape, Hardware
from moeprof.placement.policies import POLICIES
from moeprof.placement.run import sim_config
from moeprof.placement.sample import plan_sample
from moeprof.placement.replay import LOAD_FREE, Replay, Run, pass_of_rows, replay, schedules
from moeprof.placement.topology import Topology, build_topology
from moeprof.trace.reader import Trace


# -- the whole comparison ---------------------------------------------------------------------------
def expert_shape(trace: Trace, data: RoutingData, *, hidden_size: int | None, dtype_bytes: int | None,
                 moe_intermediate_size: int | None, weight_bytes: int | None) -> tuple[ExpertShape, list[str]]:
    """The expert's dimensions: options first, then the manifest (``model.moe_intermediate_size``, or
    the ``config.json`` of the model the capture names), else an error saying which option to pass."""
    cfg, notes = sim_config(data, hidden_size=hidden_size, dtype_bytes=dtype_bytes)
    inter = moe_intermediate_size
    if inter is None:
        raw = json.loads((trace.path / "manifest.json").read_text())
        inter = (raw.get("model") or {}).get("moe_intermediate_size")
        model_dir = (raw.get("capture") or {}).get("model")
        if inter is None and isinstance(model_dir, str):
            # A capture of the embedded default records "sample_data/tiny-moe": the shipped package's copy,
            # wherever the user stands (the last base), not only from the repository root.
            for base in (Path.cwd(), trace.path.parent, trace.path.parent.parent, _shipped_root()):
                cfg_file = base / model_dir / "config.json"
                if cfg_file.is_file():
                    try:
                        inter = json.loads(cfg_file.read_text()).get("moe_intermediate_size")
                    except (OSError, json.JSONDecodeError):
                        inter = None
                    if inter:
                        shown = cfg_file.relative_to(Path.cwd()) if cfg_file.is_relative_to(Path.cwd()) else cfg_file
                        notes.append(f"moe_intermediate_size {inter} from {shown}")
                        break
    if inter is None:
        raise UsageError(
            f"{trace.path}: the manifest does not record the experts' intermediate size; pass "
            "--moe-intermediate-size (e.g. 8192 for Llama-4-Maverick, 2048 for DeepSeek-V3)")
    if int(inter) < 1 or (weight_bytes is not None and weight_bytes < 1):
        raise UsageError("--moe-intermediate-size and --weight-bytes must be at least 1")
    wb = int(weight_bytes or cfg.dtype_bytes)
    return ExpertShape(cfg.hidden_size, int(inter), cfg.dtype_bytes, wb), notes


def _shipped_root() -> Path:
    """The directory that holds the installed ``sample_data`` (the repository root in a checkout)."""
    from moeprof import sample_data

    return Path(sample_data.__file__).resolve().parent.parent


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
    # every request: the replay needs each pass whole (a request sample would thin every pass), so
    # --timeline is for traces whose decode rows fit this process (moeprof.placement.sample)
    whole = plan_sample(opened, phase="decode", max_requests=sys.maxsize, max_rows=sys.maxsize)
    data = load_routing(opened, "decode", sample=whole)
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
               f"{_seconds(best['migration_one_time_s'])})")
    else:
        mig = (f", counting its rebalances' weight traffic ({best['experts_moved'] / n:.0f} experts, "
               f"{_human(best['migration_bytes'] / n)} every {best['schedule']['every']} passes on average: "
               f"{_seconds(best['migration_us_per_step'] * 1e-6)} per step)")
    return (f"On this trace and {where}, {best['key']} gives the lowest predicted MoE time per decode step: "
            f"{best['us_per_step']:.4g} µs against {base['us_per_step']:.4g} µs for the engine default "
            f"(linear, no EPLB), {best['vs_default']['step_time']:+.1%}{mig}.")


def _seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_timeline_out(out: str | Path, force: bool) -> Path:
    """Refuse to replace an earlier timeline in ``out`` unless ``force``, or to write where nothing can be
    written (read-only, no permission: said before the replay, not after it); nothing is written here."""
    from moeprof.errors import OutputExistsError
    from moeprof.outputs import check_writable

    out = Path(out)
    if out.exists() and any(out.glob("timeline.*")) and not force:
        raise OutputExistsError(f"{out} already holds a timeline; pass --force to replace it")
    check_writable(out, target=out)
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
