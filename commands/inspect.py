"""`moeprof inspect`: validate a trace (schema, version, checksums, row counts) and summarise it."""

from __future__ import annotations

import json

import typer

from moeprof.commands.options import JsonFlag, TraceArg
from moeprof.report.console import console, progress_bar


def inspect(
    trace: TraceArg,
    as_json: JsonFlag = False,
    quick: bool = typer.Option(False, "--quick", help="Skip the sha256 checks (row counts and sizes only)."),
) -> None:
    """Validate a trace and print what it holds.

    Checks the format version, every shard's schema, size and row count against the manifest and,
    unless --quick, its sha256; and, from the shards' column statistics, that expert ids and layers are
    within the manifest's model. Exits non-zero naming the first shard that disagrees.

    Example:

        moeprof inspect moeprof-demo/trace
    """
    from moeprof.report.terminal import render_trace_summary
    from moeprof.trace.reader import Trace
    from moeprof.trace.summary import describe

    opened = Trace.open(trace, verify="none")
    shards = opened.manifest.shards
    if quick:
        opened.verify(full=False)
    else:
        with progress_bar(transient=True, disable=as_json) as bar:
            task = bar.add_task("verifying shards", total=len(shards))
            opened.verify(full=True, progress=lambda _s: bar.advance(task))
    opened.check_ranges()
    info = describe(opened)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        render_trace_summary(info, console())
