"""`moeprof merge`: one trace from the traces of many ranks or captures, without copying rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moeprof.commands.options import Force, JsonFlag
from moeprof.report.console import console


def merge(
    traces: Annotated[list[str], typer.Argument(help="Two or more trace directories (one model, one source).",
                                                 show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory of the merged trace (manifest and requests).")],
    force: Force = False,
    as_json: JsonFlag = False,
) -> None:
    """Merge traces of many ranks or captures into one trace, without copying a routing row.

    The merged trace holds a manifest that lists every source's shards by relative path, and the
    union of their requests; every command reads it like any trace. Request ids must be distinct
    across the sources; forward-pass ids that overlap across them are marked as not comparable.

    Example:

        moeprof merge rank0/trace rank1/trace --out fleet-trace
    """
    from moeprof.trace.merge import merge_traces

    manifest = merge_traces(traces, out, force=force)
    routing = manifest.shards_of("routing")
    info = dict(out=str(out), traces=len(traces), routing_shards=len(routing),
                routing_rows=sum(s.rows for s in routing), complete=manifest.complete,
                missing=manifest.missing)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console().print(
        f"Wrote {out}: {len(traces)} traces, {len(routing)} routing shards, {info['routing_rows']:,} rows "
        f"(listed, not copied){'' if manifest.complete else '; incomplete: a source is marked incomplete'}",
        highlight=False,
    )
    for cap, why in manifest.missing.items():
        console().print(f"note: {cap}: {why}", style="yellow", highlight=False)
