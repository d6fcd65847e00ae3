"""Options shared by several subcommands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

TraceArg = Annotated[
    Path,
    typer.Argument(help="Trace directory written by `moeprof capture` or `moeprof import`.", show_default=False),
]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
