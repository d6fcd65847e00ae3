"""`moeprof import`: read a serving engine's routing dump into a trace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeprof.commands.options import IMPORT_FORMATS, Force, JsonFlag, OutDir
from moeprof.report.console import console, progress_bar


def import_(
    fmt: Annotated[
        str,
        typer.Argument(
            metavar="FORMAT",
            help=f"auto, or one of: {', '.join(IMPORT_FORMATS)}. auto reads the format from each file's content.",
            show_default=False,
        ),
    ],
    sources: Annotated[list[Path], typer.Argument(metavar="SRC...", help="Dump files to import (a directory for expert-selection traces).", show_default=False)],
    out: OutDir = Path("trace"),
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Model name for the manifest (default: the name the source records, else "
                                              "'unknown').")] = None,
    num_experts: Annotated[
        Optional[int], typer.Option("--num-experts", min=1, help="Routed experts per layer; ids must be below it (default: what the "
                                              "source records, else the largest id + 1, with a note).")
    ] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, help="Experts per token; every record must agree (default: what the "
                                      "records hold; 1, with a note, for counts).")] = None,
    domains: Annotated[
        Optional[Path], typer.Option("--domains", help="CSV request_id,domain that attaches a domain to each request (default: "
                                    "none; requests are 'unlabelled').")
    ] = None,
    phase_from: Annotated[
        str,
        typer.Option(
            "--phase-from",
            help="Where per-token JSONL gets prefill/decode: auto (phase or step field), none, "
            "field:NAME, or prompt-len:FILE.csv (request_id,prompt_tokens).",
        ),
    ] = "auto",
    field: Annotated[
        Optional[list[str]],
        typer.Option("--field", help="Rename a field of the source: CANONICAL=NAME, e.g. topk_ids=experts (repeatable)."),
    ] = None,
    drop_warmup: Annotated[
        bool, typer.Option("--drop-warmup", help="Drop rows that look like engine warm-up (always reported).")
    ] = False,
    force: Force = False,
    as_json: JsonFlag = False,
) -> None:
    """Import routing dumps from SGLang, vLLM, Megatron, TensorRT-LLM, per-token JSONL, a counts table or expert-selection traces.

    Writes a trace (the same format `moeprof capture` writes) so that every analysis and placement
    runs on it. What the source lacks (phase, request ids, weights, ...) is listed in the manifest's
    `missing`; warm-up rows are always counted and reported, and dropped with --drop-warmup.

    Example:

        moeprof import auto expert_distribution_recorder_1718000000.0_0.pt --out trace --drop-warmup

        moeprof import jsonl routes.jsonl --field topk_ids=experts --domains domains.csv --out trace

        moeprof import auto llama4_maverick_mmlu/original.tar.gz --num-experts 128 --out trace
    """
    from moeprof.importers import ImportOptions, import_trace
    from moeprof.importers.jsonl import parse_field_map

    options = ImportOptions(
        model_name=model_name,
        num_experts=num_experts,
        top_k=top_k,
        domains=domains,
        phase_from=phase_from,
        drop_warmup=drop_warmup,
        force=force,
        fields=parse_field_map(field),
    )
    total = sum(p.stat().st_size for p in sources if p.is_file())
    with progress_bar(transient=True, disable=as_json or total < (8 << 20)) as bar:
        task = bar.add_task("importing", total=total)
        report = import_trace(fmt, sources, out, options, progress=lambda n: bar.advance(task, n))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    _render(report)


def _render(report) -> None:
    out = console()
    what = f"{report.routing_rows} routing rows" if report.routing_rows else f"{report.loads_rows} count rows"
    out.print(f"Imported {what}, {report.requests} requests ({report.format}) into {report.out}")
    for reason, rows in report.warmup.items():
        verb = "dropped" if report.warmup_dropped else "kept; pass --drop-warmup to drop them"
        out.print(f"  warm-up: {rows} rows {verb}: {reason}")
    if not report.warmup:
        out.print("  warm-up: 0 rows (none detected)")
    for reason, rows in report.skipped.items():
        out.print(f"  skipped: {rows} rows: {reason}")
    for cap, reason in report.missing.items():
        out.print(f"  missing {cap}: {reason}")
