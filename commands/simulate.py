"""`moeprof simulate`: traffic and GPU load of a placement, or of every policy side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moeprof.commands.options import Force, JsonFlag, TraceArg
from moeprof.commands.place import DtypeBytes, HiddenSize, Redundant, Seed, SlotsPerGpu, TestFraction
from moeprof.errors import UsageError
from moeprof.outputs import check_entries
from moeprof.placement.run import compare, simulate_placement, write_comparison
from moeprof.report.console import console
from moeprof.report.placement import render_comparison, render_metrics
from moeprof.report.placement_plot import plot_comparison


def simulate(
    trace: TraceArg,
    placement: Optional[Path] = typer.Option(None, "--placement", help="placement.json written by `moeprof place`."),
    compare_all: bool = typer.Option(False, "--compare", help="Fit every policy on the train split, score all."),
    nodes: Optional[int] = typer.Option(None, "--nodes", "-n", help="--compare: nodes."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", "-g", help="--compare: GPUs per node."),
    slots_per_gpu: SlotsPerGpu = None,
    redundant: Redundant = None,
    hidden_size: HiddenSize = None,
    dtype_bytes: DtypeBytes = None,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Tokens per micro-batch for GPU load [256]."),
    seed: Seed = 0,
    test_fraction: TestFraction = 0.3,
    out: Path = typer.Option(Path("moeprof-compare"), "--out", "-o", help="--compare: directory for the table, plot and placements."),
    force: Force = False,
    as_json: JsonFlag = False,
) -> None:
    """Simulate the all-to-all traffic and GPU load of expert placements on held-out requests.

    With --placement, scores one placement.json on the trace (on the held-out split it was fitted
    with, when it is the same trace). With --compare, fits every policy (linear, round_robin, eplb,
    kmeans, locality, and locality with the oracle domain grouping as a reference) on the train split
    and scores them all on the held-out split: one table, one plot (PNG + SVG) in OUT, the expert
    capacity report (capacity factor for < 1% drops per batch size) and the node-limited routing
    report (token-layers whose experts span more than M nodes).

    Example:

        moeprof simulate trace --compare --nodes 2 --gpus-per-node 4 --out moeprof-compare
    """
    if compare_all == (placement is not None):
        raise UsageError("give either --placement FILE or --compare (with --nodes and --gpus-per-node)")
    con = console()
    if placement is not None:
        p, metrics, notes = simulate_placement(trace, placement, hidden_size=hidden_size, dtype_bytes=dtype_bytes,
                                               batch_size=batch_size)
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
    check_entries(out, ["compare.json"], force)  # before the policies are fitted
    cmp = compare(trace, nodes=nodes, gpus_per_node=gpus_per_node, slots_per_gpu=slots_per_gpu,
                  redundant=redundant, seed=seed, test_fraction=test_fraction, hidden_size=hidden_size,
                  dtype_bytes=dtype_bytes, batch_size=batch_size)
    files = write_comparison(cmp, out, force=force, plot=plot_comparison)
    d = cmp.to_dict()
    if as_json:
        typer.echo(json.dumps(d, indent=2))
    else:
        render_comparison(d, con, files=[str(f) for f in files])
