"""`moeprof simulate`: traffic and GPU load of a placement, or of every policy side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moeprof.commands.options import AddressOpt, EngineName, EngineOpt, Force, JsonFlag, TraceLocation
from moeprof.commands.place import (DtypeBytes, HiddenSize, Redundant, SampleRequests, SampleRows, Seed, SlotsPerGpu,
                                    TestFraction)
from moeprof.errors import UsageError
from moeprof.report.console import console


def simulate(
    trace: TraceLocation,
    placement: Optional[Path] = typer.Option(None, "--placement", help="placement.json written by `moeprof place`."),
    compare_all: bool = typer.Option(False, "--compare", help="Fit every policy on the train split, score all."),
    timeline: bool = typer.Option(False, "--timeline", help="Replay the decode steps in time order under static "
                                  "placements and periodic rebalancing; predict µs per step; give the verdict."),
    nodes: Optional[int] = typer.Option(None, "--nodes", "-n", help="--compare / --timeline: nodes."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", "-g", help="--compare / --timeline: GPUs per node."),
    slots_per_gpu: SlotsPerGpu = None,
    redundant: Redundant = None,
    hidden_size: HiddenSize = None,
    dtype_bytes: DtypeBytes = None,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Tokens per micro-batch for GPU load (default: 256).", show_default=False),
    seed: Seed = 0,
    test_fraction: TestFraction = 0.3,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="--compare: directory for the table, plot and "
                                       "placements (default: moeprof-compare); --timeline: for its JSON, CSV and plots (default: moeprof-timeline).", show_default=False),
    force: Force = False,
    as_json: JsonFlag = False,
    policies: str = typer.Option("linear,eplb", "--policies", help="--timeline: registered policies to replay, comma-separated."),
    rebalance_every: Optional[str] = typer.Option(None, "--rebalance-every", help="--timeline: rebalance intervals in passes, "
                                                  "comma-separated (default: a 16th, an 8th and a quarter of the trace).", show_default=False),
    window: Optional[int] = typer.Option(None, "--window", help="--timeline: passes of load each rebalance fits on (default: the interval, as SGLang).", show_default=False),
    concurrency: int = typer.Option(64, "--concurrency", help="--timeline, traces without batch_id: requests in flight."),
    report_windows: int = typer.Option(20, "--report-windows", help="--timeline: windows in the per-window table and plot."),
    moe_intermediate_size: Optional[int] = typer.Option(None, "--moe-intermediate-size", help="--timeline: expert intermediate size (default: the manifest's).", show_default=False),
    weight_bytes: Optional[int] = typer.Option(None, "--weight-bytes", help="--timeline: bytes per expert weight (default: --dtype-bytes).", show_default=False),
    gpu: str = typer.Option("h100", "--gpu", help="--timeline: GPU preset for the roofline: h100, h200."),
    intra_fabric: str = typer.Option("nvlink4", "--intra-fabric", help="--timeline: intra-node link preset: nvlink4, nvlink3, pcie5."),
    inter_fabric: str = typer.Option("ib400", "--inter-fabric", help="--timeline: inter-node link preset: ib400, roce400, ib200."),
    intra_bw: Optional[float] = typer.Option(None, "--intra-bw", help="--timeline: intra-node GB/s per GPU per direction (overrides the preset)."),
    inter_bw: Optional[float] = typer.Option(None, "--inter-bw", help="--timeline: inter-node GB/s per GPU per direction (overrides the preset)."),
    gpu_tflops: Optional[float] = typer.Option(None, "--gpu-tflops", help="--timeline: peak TFLOP/s (overrides the preset)."),
    gpu_hbm_bw: Optional[float] = typer.Option(None, "--gpu-hbm-bw", help="--timeline: HBM GB/s (overrides the preset)."),
    link_latency_us: float = typer.Option(0.0, "--link-latency-us", help="--timeline: fixed µs added to each dispatch and combine."),
    rank_cost: Optional[Path] = typer.Option(None, "--rank-cost", help="--timeline: SGLang EP topology JSON "
                                             '{"rank_cost_matrix": [[...]]}; placements then prefer cheap links.'),
    engine: EngineOpt = EngineName.local,
    address: AddressOpt = None,
    sample_requests: SampleRequests = None,
    sample_rows: SampleRows = None,
    ctx: typer.Context = None,
) -> None:
    """Simulate the all-to-all traffic and GPU load of expert placements on held-out requests.

    With --placement, scores one placement.json on the trace (on the held-out split it was fitted
    with, when it is the same trace). With --compare, fits every policy (linear, round_robin, eplb,
    kmeans, locality, and locality with the oracle domain grouping as a reference) on the train split
    and scores them all on the held-out split: one table, one plot (PNG + SVG) in OUT, the expert
    capacity report (capacity factor for < 1% drops per batch size) and the node-limited routing
    report (token-layers whose experts span more than M nodes).

    With --timeline, replays the decode steps in time order (the trace's batch_id, else requests in
    arrival order, --concurrency at a time) under the engine default (linear, never rebalanced), a
    placement fitted once on the first window, and periodic rebalancing every N passes from the last
    window (SGLang's and vLLM's schedules included when the trace is long enough), for each policy;
    predicts the MoE time per decode step (dispatch + combine from the bytes on each link, expert
    compute as a roofline) and the weights each rebalance moves, and says which wins.

    Examples:

        moeprof simulate trace --compare --nodes 2 --gpus-per-node 4 --out moeprof-compare

        moeprof simulate trace --timeline -n 2 -g 8 --policies linear,eplb --rebalance-every 100,200

    With --engine ray, shards are read by Ray tasks; the K-means rounds of the policies' fits and
    the scoring of blocks of held-out rows run as Ray tasks too; the results are the same as a local
    run's.

    --placement and --compare read only a request sample (--sample-requests, --sample-rows; every
    request of a trace under both). With --placement the default is the sample the placement was
    scored on in `moeprof place` (recorded in it); a different budget on the same trace is refused.

        moeprof simulate trace --compare -n 8 -g 8 --sample-requests 2048 --sample-rows 4000000 --out moeprof-compare
    """
    from moeprof.placement.run import compare, simulate_placement, write_comparison
    from moeprof.report.placement import render_comparison, render_metrics

    if sum([compare_all, timeline, placement is not None]) != 1:
        raise UsageError("give one of --placement FILE, --compare or --timeline (the last two with --nodes and --gpus-per-node)")
    _refuse_unused(ctx, "--timeline" if timeline else "--compare" if compare_all else "--placement")
    runner = None
    if engine is EngineName.ray or address is not None:
        from moeprof.analysis.engine import get_engine

        runner = get_engine(engine.value, address)
    con = console()
    if timeline:
        if sample_requests is not None or sample_rows is not None:
            raise UsageError("--sample-requests and --sample-rows apply to --placement and --compare; --timeline "
                             "replays every request of the trace")
        _timeline(trace, nodes, gpus_per_node, slots_per_gpu, redundant, hidden_size, dtype_bytes, seed, out, force,
                  as_json, policies, rebalance_every, window, concurrency, report_windows, moe_intermediate_size,
                  weight_bytes, gpu, intra_fabric, inter_fabric, intra_bw, inter_bw, gpu_tflops, gpu_hbm_bw,
                  link_latency_us, rank_cost, con)
        return
    if placement is not None:
        p, metrics, notes = simulate_placement(trace, placement, hidden_size=hidden_size, dtype_bytes=dtype_bytes,
                                               batch_size=batch_size, engine=runner, sample_requests=sample_requests,
                                               sample_rows=sample_rows)
        if as_json:
            typer.echo(json.dumps(dict(metrics=metrics, notes=notes), indent=2))
            return
        con.print(f"[bold]{p.policy}[/] placement from {placement}: {p.topology.describe()}")
        render_metrics(metrics, con)
        for n in notes:
            con.print(f"note: {n}", style="yellow")
        return
    if nodes is None or gpus_per_node is None:
        raise UsageError("--compare needs --nodes and --gpus-per-node")
    from moeprof.outputs import check_entries

    out = out or Path("moeprof-compare")
    check_entries(out, ["compare.json"], force)  # before the policies are fitted
    cmp = compare(trace, nodes=nodes, gpus_per_node=gpus_per_node, slots_per_gpu=slots_per_gpu,
                  redundant=redundant, seed=seed, test_fraction=test_fraction, hidden_size=hidden_size,
                  dtype_bytes=dtype_bytes, batch_size=batch_size, engine=runner, sample_requests=sample_requests,
                  sample_rows=sample_rows)
    from moeprof.report.placement_plot import plot_comparison

    files = write_comparison(cmp, out, force=force, plot=plot_comparison)
    d = cmp.to_dict()
    if as_json:
        typer.echo(json.dumps(d, indent=2))
    else:
        render_comparison(d, con, files=[str(f) for f in files])


# Options only some modes read; given to another, they were ignored without a word.
_TIMELINE_ONLY = {"policies", "rebalance_every", "window", "concurrency", "report_windows", "moe_intermediate_size",
                  "weight_bytes", "gpu", "intra_fabric", "inter_fabric", "intra_bw", "inter_bw", "gpu_tflops",
                  "gpu_hbm_bw", "link_latency_us", "rank_cost"}
_UNUSED = {
    "--placement": _TIMELINE_ONLY | {"nodes", "gpus_per_node", "slots_per_gpu", "redundant", "seed", "test_fraction",
                                     "out", "force"},
    "--compare": _TIMELINE_ONLY,
    "--timeline": {"batch_size", "test_fraction"},
}


def _refuse_unused(ctx: Optional[typer.Context], mode: str) -> None:
    if ctx is None:
        return
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if param.name in _UNUSED[mode] and source is not None and source.name == "COMMANDLINE":
            why = ("it writes no file; --json prints the result" if param.name in ("out", "force")
                   else "the placement file fixes the topology and the split" if mode == "--placement"
                   else "it is not read there")
            raise UsageError(f"{param.opts[0]} does not apply to simulate {mode} ({why}); leave it out")


def _ints(text: Optional[str], option: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} takes whole numbers separated by commas, got {text!r}") from None


def _timeline(trace, nodes, gpus_per_node, slots_per_gpu, redundant, hidden_size, dtype_bytes, seed, out, force,
              as_json, policies, rebalance_every, window, concurrency, report_windows, moe_intermediate_size,
              weight_bytes, gpu, intra_fabric, inter_fabric, intra_bw, inter_bw, gpu_tflops, gpu_hbm_bw,
              link_latency_us, rank_cost, con) -> None:
    from moeprof.placement.latency import hardware
    from moeprof.placement.timeline import check_timeline_out, timeline, write_timeline
    from moeprof.report.timeline import plot_timeline, plot_traffic, render_timeline, write_matrix_csv

    if nodes is None or gpus_per_node is None:
        raise UsageError("--timeline needs --nodes and --gpus-per-node")
    out = check_timeline_out(out or Path("moeprof-timeline"), force)
    hw = hardware(gpu, intra_fabric, inter_fabric, intra_gbps=intra_bw, inter_gbps=inter_bw, tflops=gpu_tflops,
                  hbm_gbps=gpu_hbm_bw, link_latency_us=link_latency_us)
    d = timeline(trace, nodes=nodes, gpus_per_node=gpus_per_node, hw=hw,
                 policies=[p.strip() for p in policies.split(",") if p.strip()],
                 every=_ints(rebalance_every, "--rebalance-every"), window=window, slots_per_gpu=slots_per_gpu,
                 redundant=redundant, concurrency=concurrency, report_windows=report_windows,
                 hidden_size=hidden_size, dtype_bytes=dtype_bytes, moe_intermediate_size=moe_intermediate_size,
                 weight_bytes=weight_bytes, rank_cost=rank_cost, seed=seed)
    files = [write_timeline(d, out, force=force)]
    files += write_matrix_csv(d, out)
    files += plot_timeline(d, out / "timeline") + plot_traffic(d, out / "traffic")
    if as_json:
        typer.echo(json.dumps(d, indent=2))
    else:
        render_timeline(d, con, files=[str(f) for f in files])
