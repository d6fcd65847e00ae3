"""`moeprof analyze`: imbalance, domain shift, prefill→decode correlation and co-activation of a trace."""

from __future__ import annotations

from contextlib import nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from moeprof.commands.options import DEFAULT_BATCH_SIZES, AddressOpt, EngineName, EngineOpt, Force, TraceLocation
from moeprof.errors import UsageError
from moeprof.report.console import console, err_console, progress_bar


class Format(str, Enum):
    table = "table"
    json = "json"


class CoactivationTables(str, Enum):
    top = "top"
    full = "full"


def parse_layers(text: str) -> list[int]:
    """``"0,3-5"`` -> ``[0, 3, 4, 5]``; a clear error for anything else."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise UsageError(f"--layers: {part!r} is not a layer number or a range like 3-5") from None
        if b < a:
            raise UsageError(f"--layers: range {part!r} runs backwards; write it as {b}-{a}")
        out.extend(range(a, b + 1))
    return out


def parse_figures(text: str) -> tuple[str, ...]:
    """``"png,svg"`` -> ``("png", "svg")``; ``"none"`` -> ``()``; a clear error for anything else."""
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    if parts == ["none"]:
        return ()
    bad = [p for p in parts if p not in ("png", "svg")]
    if bad or not parts:
        raise UsageError(f"--figures: {text!r}: give png, svg, png,svg or none")
    return tuple(dict.fromkeys(parts))


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes: {text!r} is not a list of integers like 1,8,64,512,4096") from None
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError(f"--batch-sizes: {text!r}: give positive integers, e.g. 1,8,64,512,4096")
    return sorted(set(sizes))


def analyze(
    trace: TraceLocation,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Write summary.json, Parquet tables and the figures (--figures) here "
                                        "(default: none; the tables are printed only)."),
    ] = None,
    layers: Annotated[
        Optional[str], typer.Option("--layers", help="MoE layers to analyze, e.g. 0,3-5 (default: all).")
    ] = None,
    domains: Annotated[
        Optional[str], typer.Option("--domains", help="Domains to analyze, e.g. code,math (default: all).")
    ] = None,
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="Batch sizes (tokens) for batch-level imbalance.")
    ] = ",".join(map(str, DEFAULT_BATCH_SIZES)),
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary JSON instead of tables.")] = False,
    fmt: Annotated[
        Optional[Format],
        typer.Option("--format", hidden=True, help="Deprecated: use --json.", show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of every random choice (sampling, splits, bootstrap).")] = 0,
    sample_tokens: Annotated[
        int,
        typer.Option("--sample-tokens", min=1, help="Tokens sampled for batch imbalance and co-activation (exact below this)."),
    ] = 1 << 17,
    sample_requests: Annotated[
        int,
        typer.Option("--sample-requests", min=1,
                     help="Requests whose own counts feed classification and prefill→decode (exact below this)."),
    ] = 4096,
    coactivation_tables: Annotated[
        CoactivationTables,
        typer.Option("--coactivation-tables",
                     help="Co-activation tables in --out: 'top' (each expert's most frequent partners and next "
                          "experts) or 'full' (every non-zero pair and transition; millions of rows at 256 experts)."),
    ] = CoactivationTables.top,
    figures: Annotated[
        str,
        typer.Option("--figures", help="Figure formats written into --out/plots: png,svg, png, svg or none "
                                       "(drawing them is most of a small trace's time; `moeprof report` draws its own)."),
    ] = "png,svg",
    force: Force = False,
    engine: EngineOpt = EngineName.local,
    address: AddressOpt = None,
) -> None:
    """Measure load imbalance, domain shift, prefill→decode correlation and co-activation.

    Statistics the trace cannot support (count-only traces, no phase, one domain, ...) are reported
    as not available, with the reason.

    Example:

        moeprof analyze moeprof-demo/trace --out moeprof-demo/code-math --layers 0,2-3 --domains code,math

        moeprof analyze s3://bucket/traces/day1 --engine ray --address auto --out day1-analysis

        moeprof analyze big-trace --out big-analysis --figures none     # statistics and tables only
    """
    formats = parse_figures(figures)
    if fmt is not None:
        err_console().print("note: --format is deprecated; use --json (or nothing, for tables)", style="yellow")
        as_json = as_json or fmt is Format.json
    options = dict(
        layers=parse_layers(layers) if layers is not None else None,
        domains=[d.strip() for d in domains.split(",")] if domains is not None else None,
        batch_sizes=parse_batch_sizes(batch_sizes),
        seed=seed,
        sample_tokens=sample_tokens,
        sample_requests=sample_requests,
        coactivation_tables=coactivation_tables.value,
        engine=engine.value,
        address=address,
    )
    figure_writer: Any = nullcontext()
    if out is not None and formats:  # figures only for an output directory, drawn in worker processes
        from moeprof.outputs import check_target, refuse_overwriting_input
        from moeprof.report.figures import FigureWriter

        # before starting workers for an output that cannot be written
        refuse_overwriting_input(out, trace, f"the trace being read ({trace})")
        check_target(out, force)
        figure_writer = FigureWriter(formats)
    with figure_writer as draw_figures, progress_bar(transient=True, disable=as_json) as bar:
        # Imported once the workers have started: this process has one thread until polars is imported,
        # so they are forked (report.figures._start_method).
        from moeprof.analysis.run import analyze as run_analysis, summary_json

        task = bar.add_task("reading routing", total=None)
        result = run_analysis(
            trace, out=out, force=force, progress=lambda done, total: bar.update(task, completed=done, total=total),
            writers=[draw_figures] if draw_figures else [], **options,
        )
    for warning in result.summary.get("warnings", []):
        err_console().print(f"warning: {warning}", style="yellow", highlight=False)
    if as_json:
        typer.echo(summary_json(result))
    else:
        from moeprof.report.analysis_tables import render_analysis

        render_analysis(result.summary, console(), out=out)
