"""Options shared by several subcommands, declared once.

Command modules import only typer, rich and this module at import time, so that `moeprof --help` and
every command start fast; a command imports the library it needs when it runs. The choice lists
below are spelled out here for the same reason; tests/test_cli_consistency.py checks them against the
library's registries.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

TraceArg = Annotated[
    str,
    typer.Argument(help="Trace directory written by `moeprof capture` or `moeprof import`, or its URI "
                        "(s3://, gs://, hdfs://, file://).", show_default=False),
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
                                  "(needs the ray extra). The results are the same."),
]
AddressOpt = Annotated[
    Optional[str],
    typer.Option("--address", help="--engine ray: the cluster to use, 'auto' (the running one) or "
                                   "ray://HOST:PORT (default: start Ray on this machine).", show_default=False),
]


# Registries of the library (checked equal in tests): placement.policies.POLICIES,
# placement.grouping.GROUPINGS, placement.export.EXPORTERS, importers.FORMATS,
# analysis.run.DEFAULT_BATCH_SIZES.
POLICY_NAMES = ("linear", "round_robin", "eplb", "kmeans", "locality")
GROUPING_NAMES = ("random", "domain", "prefill")
EXPORTER_NAMES = ("sglang", "trtllm", "deepseek", "vllm-ascend")
IMPORT_FORMATS = ("sglang", "vllm", "megatron", "megatron-tpe", "trtllm", "jsonl", "counts", "expert-selection")
DEFAULT_BATCH_SIZES = (1, 8, 64, 512, 4096)
