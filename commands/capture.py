"""`moeprof capture`: run a workload through a Hugging Face MoE model and record its routing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from moeprof.commands.options import Force, JsonFlag, OutDir
from moeprof.report.console import console, progress_bar
from moeprof.report.terminal import human_bytes


def capture(
    out: OutDir,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            "-m",
            help="Local model directory or a name in the local Hugging Face cache (loaded offline). "
            "Default: the shipped tiny model.",
            show_default=False,
        ),
    ] = None,
    prompts: Annotated[
        Optional[Path],
        typer.Option(
            "--prompts",
            help="Workload JSONL: domain, text or messages, optional id and dataset. Default: the sample workload.",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Prompts per generate() call.")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens generated per prompt.")] = 32,
    device: Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16.")] = "auto",
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=1, help="Capture only the first N prompts.", show_default=False)
    ] = None,
    batching: Annotated[
        str,
        typer.Option(
            "--batching",
            help="static: generate() on padded batches of --batch-size prompts. continuous: transformers' "
            "continuous batching (paged attention; prefill chunks and decode tokens of up to --batch-size "
            "requests share forward passes, as in `transformers serve`).",
        ),
    ] = "static",
    threads: Annotated[
        Optional[int],
        typer.Option(
            "--threads",
            help="torch CPU threads. Default: half the cores (at least 1), which stays fast when other jobs share the machine.",
            show_default=False,
        ),
    ] = None,
    force: Force = False,
    as_json: JsonFlag = False,
) -> None:
    """Capture per-token expert routing of greedy generate() over a workload into a trace.

    Every MoE layer's chosen experts (the ids the experts actually receive) are recorded for every
    prompt token and every generated token fed back to the model, with request, domain, position,
    step and phase. Ctrl-C leaves a valid trace marked incomplete.

    Example:

        moeprof capture --model ./my-moe --prompts prompts.jsonl --out traces/run1 --max-new-tokens 64
    """
    from moeprof.capture.run import run_capture

    with progress_bar(transient=True, disable=as_json) as bar:
        task = bar.add_task("capturing", total=None)

        def progress(done: int, total: int, rows: int, rate: float) -> None:
            bar.update(task, completed=done, total=total, description=f"capturing ({rate:,.0f} tokens/s, {rows:,} rows)")

        summary = run_capture(
            out,
            model=model,
            prompts=prompts,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            device=device,
            dtype=dtype,
            force=force,
            limit=limit,
            batching=batching,
            threads=threads,
            progress=progress,
        )
    if as_json:
        import dataclasses
        import json

        typer.echo(json.dumps(dataclasses.asdict(summary), indent=2, default=str))
        return
    con = console()
    con.print(f"[bold]captured[/] {summary.out}  ({summary.model}, {summary.architecture})")
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="dim")
    t.add_column()
    t.add_row("requests", f"{summary.requests} (" + ", ".join(f"{d} {n}" for d, n in summary.domains.items()) + ")")
    t.add_row("tokens", f"prefill {summary.prompt_tokens:,}, decode {summary.decode_tokens:,}")
    t.add_row(
        "MoE layers",
        f"{len(summary.moe_layers)} of {len(summary.moe_layers) + len(summary.dense_layers)}, "
        f"{summary.num_experts} experts, top-{summary.top_k}"
        + (f", {summary.num_shared_experts} shared" if summary.num_shared_experts else ""),
    )
    t.add_row("routing rows", f"{summary.rows:,}")
    t.add_row("trace size", human_bytes(summary.trace_bytes))
    t.add_row("time", f"{summary.seconds:.1f} s ({summary.tokens_per_second:,.0f} tokens/s)")
    for note in summary.notes:
        t.add_row("note", note)
    con.print(t)
