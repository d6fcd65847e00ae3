"""Options shared by several subcommands, declared once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

TraceArg = Annotated[
    Path,
    typer.Argument(help="Trace directory written by `moeprof capture` or `moeprof import`.", show_default=False),
]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]

TraceLocation = Annotated[
    str,
    typer.Argument(
        help="Trace directory, or its URI on object storage or a shared filesystem (s3://, gs://, hdfs://, file://).",
        show_default=False,
    ),
]


class EngineName(str, Enum):
    local = "local"
    ray = "ray"


EngineOpt = Annotated[
    EngineName,
    typer.Option("--engine", help="Where shards are read and counted: local threads, or one Ray task per shard "
                                  "(needs moeprof[ray]). The results are the same."),
]
AddressOpt = Annotated[
    Optional[str],
    typer.Option("--address", help="--engine ray: the cluster to use, 'auto' (the running one) or "
                                   "ray://HOST:PORT (default: start Ray on this machine).", show_default=False),
]
