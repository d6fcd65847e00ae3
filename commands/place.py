"""`moeprof place`: fit a placement policy on a trace and write placement.json (+ engine formats)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeprof.commands.options import (EXPORTER_NAMES, GROUPING_NAMES, POLICY_NAMES, AddressOpt, EngineName, EngineOpt,
                                      Force, JsonFlag, TraceArg)
from moeprof.report.console import console

Nodes = Annotated[int, typer.Option("--nodes", "-n", help="Nodes (network between them).")]
GpusPerNode = Annotated[int, typer.Option("--gpus-per-node", "-g", help="GPUs per node (NVLink inside).")]
SlotsPerGpu = Annotated[
    Optional[int],
    typer.Option("--slots-per-gpu", help="Expert slots per GPU per layer (default: ceil(E / GPUs)).", show_default=False),
]
Redundant = Annotated[
    Optional[int],
    typer.Option(
        "--redundant", help="Redundant expert slots per layer, as SGLang's --ep-num-redundant-experts "
        "(default: the spare slots --slots-per-gpu leaves).",
        show_default=False,
    ),
]
HiddenSize = Annotated[
    Optional[int], typer.Option("--hidden-size", help="Elements per hidden state (default: the trace's model).", show_default=False)
]
DtypeBytes = Annotated[
    Optional[int], typer.Option("--dtype-bytes", help="Bytes per element on the wire (default: the model's dtype, else 2).", show_default=False)
]
Seed = Annotated[int, typer.Option("--seed", min=0, help="Seed of the train/test split and of every random choice.")]
TestFraction = Annotated[float, typer.Option("--test-fraction", help="Share of requests held out for scoring.")]
SampleRequests = Annotated[
    Optional[int],
    typer.Option("--sample-requests", min=1, show_default=False,
                 help="Requests read at most: those of smallest hash of (seed, request id), as analyze's "
                      "(default 4096; every request of a smaller trace)."),
]
SampleRows = Annotated[
    Optional[int],
    typer.Option("--sample-rows", min=1, show_default=False,
                 help="Token rows of the simulated phase held at most: the sample stops, in hash order, "
                      "before it would exceed them (default 8388608)."),
]


def place(
    trace: TraceArg,
    nodes: Nodes,
    gpus_per_node: GpusPerNode,
    policy: str = typer.Option(..., "--policy", "-p", help=f"Placement policy: {', '.join(POLICY_NAMES)}."),
    out: Path = typer.Option(Path("placement.json"), "--out", "-o", help="placement.json to write."),
    slots_per_gpu: SlotsPerGpu = None,
    redundant: Redundant = None,
    grouping: Optional[str] = typer.Option(
        None, "--grouping", help=f"Which node serves a request: {', '.join(GROUPING_NAMES)} (default: the policy's).",
        show_default=False,
    ),
    export: list[str] = typer.Option(
        [], "--export", "-e", help=f"Also write an engine format (repeatable): {', '.join(EXPORTER_NAMES)}.", show_default=False
    ),
    load_bound: Optional[float] = typer.Option(
        None, "--load-bound", min=1.0, help="locality: max/mean GPU load allowed (default: 1.1 × eplb's).", show_default=False
    ),
    robust: bool = typer.Option(
        True, "--robust/--no-robust",
        help="locality: hold the bound on resampled request subsets too, eplb's layer as fallback (held-out load).",
    ),
    hidden_size: HiddenSize = None,
    dtype_bytes: DtypeBytes = None,
    seed: Seed = 0,
    test_fraction: TestFraction = 0.3,
    force: Force = False,
    as_json: JsonFlag = False,
    sample_requests: SampleRequests = None,
    sample_rows: SampleRows = None,
    engine: EngineOpt = EngineName.local,
    address: AddressOpt = None,
) -> None:
    """Place experts on N nodes × G GPUs with a policy fitted on the trace's train split.

    Fits the policy on a seeded train split of the requests, simulates the placement on the held-out
    requests (cross-node and intra-node bytes per token, GPU load max/mean) and writes placement.json
    (engine names: physical_to_logical_map, logical_to_physical_map, logical_replica_count, plus the
    request-grouping model). --export writes what SGLang (--init-expert-location), TensorRT-LLM (MoE
    load balancer YAML), DeepSeek EPLB (phy2log) or vllm-ascend (expert_map_path) load, next to OUT.

    Example:

        moeprof place trace --nodes 2 --gpus-per-node 4 --policy locality --out placement.json --export sglang

    Memory is set by a budget, not by the trace: only a request sample is read (every request of a
    trace under --sample-requests and --sample-rows), fitted on its train requests and scored on its
    held-out ones; placement.json records it, and `simulate --placement` scores the same requests.
    One task per shard reads it (--engine ray: on a Ray cluster). For a fleet's trace:

        moeprof place s3://traces/fleet -n 8 -g 8 --policy eplb --sample-requests 8192 --sample-rows 20000000
    """
    from moeprof.placement.run import place as run_place
    from moeprof.report.placement import render_placement

    params = None
    if policy == "locality":
        params = {"robust": robust} | ({"load_bound": load_bound} if load_bound is not None else {})
    runner = None
    if engine is EngineName.ray or address is not None:
        from moeprof.analysis.engine import get_engine

        runner = get_engine(engine.value, address)
    placement, written, notes = run_place(
        trace, nodes=nodes, gpus_per_node=gpus_per_node, policy=policy, out=out, slots_per_gpu=slots_per_gpu,
        redundant=redundant, grouping=grouping, exports=export, seed=seed, test_fraction=test_fraction,
        params=params, hidden_size=hidden_size, dtype_bytes=dtype_bytes, force=force,
        sample_requests=sample_requests, sample_rows=sample_rows, engine=runner,
    )
    if as_json:
        typer.echo(json.dumps(dict(written=[str(p) for p in written], metrics=placement.metrics,
                                   info=placement.info, notes=notes), indent=2))
    else:
        render_placement(placement, written, notes, console())
