"""`moeprof diff`: how expert routing changed between two runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeprof.commands.options import AddressOpt, EngineName, EngineOpt, Force, JsonFlag
from moeprof.report.console import console


def diff(
    a: Annotated[str, typer.Argument(help="Run A: a trace (directory or s3://, gs://, hdfs://, file:// URI), an "
                                          "analyze output directory or its summary.json.", show_default=False)],
    b: Annotated[str, typer.Argument(help="Run B, the same kinds as A.", show_default=False)],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Also write diff.json and the figure (PNG, SVG) here.")
    ] = None,
    max_js: Annotated[
        Optional[float],
        typer.Option(help="Exit 1 if any layer's JS divergence exceeds this (a CI gate on routing drift)."),
    ] = None,
    force: Force = False,
    as_json: JsonFlag = False,
    engine: EngineOpt = EngineName.local,
    address: AddressOpt = None,
) -> int:
    """Compare the routing of two runs, layer by layer.

    Per MoE layer: JS divergence of expert popularity (0 = same, 1 = disjoint), imbalance in A and B,
    and the hot experts (top 10% by load) that appeared in B or vanished from A.

    Example:

        moeprof diff runs/v1/trace runs/v2/trace --out diff/

        moeprof diff base/analysis/summary.json new/analysis --max-js 0.05
    """
    from moeprof.errors import UsageError
    from moeprof.outputs import check_entries
    from moeprof.report.diff import DIFF_FILES, write_diff
    from moeprof.report.diff import diff as run_diff
    from moeprof.report.terminal import render_diff

    if max_js is not None and not 0 <= max_js <= 1:  # NaN too: a gate that can never fail (or never hold)
        raise UsageError(f"--max-js: {max_js} is out of range: JS divergence takes values from 0 to 1")
    if out is not None:
        check_entries(out, list(DIFF_FILES.values()), force)  # before the runs are read
    result = run_diff(a, b, engine=engine.value, address=address)
    files = write_diff(result, out, force=force) if out is not None else {}
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        render_diff(result, console(), max_js=max_js)
        if files:
            console().print(f"Wrote {files['json']}, {files['png']} and {files['svg']}", highlight=False)
    if max_js is not None and any(d.js > max_js for d in result.layers):
        return 1
    return 0
