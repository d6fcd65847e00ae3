"""`moeprof demo`: every step of moeprof on the shipped tiny model and sample workload."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moeprof.commands.options import Force
from moeprof.errors import UsageError
from moeprof.outputs import begin_demo
from moeprof.report.console import console

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Directory for everything the demo writes.")]


def _rules() -> Path:
    from moeprof.sample_data import path

    rules = path("rules.toml")
    if rules is None:  # pragma: no cover - shipped with the package
        raise UsageError("the shipped sample_data/rules.toml is missing; reinstall moeprof")
    return rules


def _steps(out: Path, limit: int | None) -> list[tuple[str, list[str]]]:
    """(title, argv) of each step, in order; a step whose command does not exist is left out."""
    trace, analysis, placement = out / "trace", out / "analysis", out / "placement"
    capture = ["capture", "--out", trace] + (["--limit", str(limit)] if limit else [])
    return [
        ("Capture the sample workload on the tiny model", capture),
        ("Validate and summarise the trace", ["inspect", trace]),
        ("Analyze routing", ["analyze", trace, "--out", analysis]),
        ("Compare placement policies on held-out requests",
         ["simulate", trace, "--compare", "--nodes", "2", "--gpus-per-node", "4", "--out", placement]),
        ("Place experts with the locality policy",
         ["place", trace, "--nodes", "2", "--gpus-per-node", "4", "--policy", "locality",
          "--grouping", "prefill", "--out", placement / "placement.json", "--export", "sglang"]),
        ("Write the report", ["report", analysis, placement, "--out", out / "report"]),
        ("Gate on thresholds", ["check", analysis, placement, "--rules", _rules()]),
    ]


def _rule(con, title: str) -> None:
    """A heading line, at most 80 columns wide (a CI log's console is wider than its reader)."""
    from rich.rule import Rule

    con.print(Rule(title), width=min(con.width, 80))


def demo(
    out: OutOpt = Path("moeprof-demo"),
    force: Force = False,
    limit: int = typer.Option(None, "--limit", min=1, help="Capture only the first N prompts (quicker)."),
) -> int:
    """Run every moeprof step on the shipped tiny MoE model and sample workload.

    Captures the sample workload into OUT/trace, then runs each other subcommand on it
    (inspect, analyze, simulate --compare, place, report, check), printing each command line
    first so you can run it yourself. No GPU and no network needed.

    Example:

        moeprof demo --out moeprof-demo
    """
    from moeprof.commands.main import COMMANDS, app, main

    out = Path(out)
    begin_demo(out, force)
    registered = {c.name for c in app.registered_commands}
    con = console()
    steps = [(title, argv) for title, argv in _steps(out, limit) if argv[0] in registered and argv[0] in COMMANDS]
    for number, (title, argv) in enumerate(steps, start=1):
        args = [str(a) for a in argv]
        if force and args[0] in {"capture", "analyze", "simulate", "place", "report"}:
            args.append("--force")
        _rule(con, f"[bold]{number}/{len(steps)} {title}")
        con.print("$ moeprof " + " ".join(args), style="cyan", highlight=False)
        code = main(args)
        if code != 0:
            what = "was interrupted" if code == 130 else f"failed with exit code {code}"
            con.print(f"[red]step {number} ({args[0]}) {what}; the demo stops here[/]")
            return code
    _rule(con, "[bold green]done")
    con.print(f"Everything is in {out}/" + (" — open report/index.html" if "report" in registered else ""))
    return 0
