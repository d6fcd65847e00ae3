"""`moeprof report`: one self-contained HTML page, a CI summary in Markdown, and the JSON behind them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moeprof.commands.options import Force, JsonFlag
from moeprof.report.console import console


def report(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="A trace (analysed now; a directory or an s3://, gs://, hdfs://, file:// URI), or output "
                 "directories / files of analyze, place and simulate --compare.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for index.html, summary.md, report.json.")] = Path("report"),
    force: Force = False,
    as_json: JsonFlag = False,
) -> None:
    """Write index.html, summary.md and report.json: one page for people, one for CI.

    index.html opens from disk with no network and prints; summary.md suits a CI job summary;
    report.json holds the numbers behind both.

    Sections: model and workload, load imbalance, domain shift, prefill → decode, co-activation, and the
    placement comparison when a `moeprof simulate --compare` result is among the inputs. Each leads with
    its finding in one sentence; a section whose statistics the inputs lack says why.

    Example:

        moeprof report moeprof-demo/trace --out report/

        moeprof report out/analysis out/compare --out report/ --force
    """
    from moeprof.report.build import write_report

    rep, files = write_report(inputs, out, force=force, workers=True)  # a trace's figures drawn in worker processes
    if as_json:
        import json

        typer.echo(json.dumps(dict(report=rep.to_json(), files={k: str(v) for k, v in files.items()}),
                              indent=2, default=str))
        return
    con = console()
    for s in rep.sections:
        if s.finding:
            con.print(f"[bold]{s.title}[/]: {s.finding}", highlight=False, soft_wrap=True)
        else:
            con.print(f"[bold]{s.title}[/]: [yellow]not available[/] ({s.unavailable})", highlight=False)
    con.print(f"Wrote {files['index.html']}, {files['summary.md']} and {files['report.json']}", highlight=False)
