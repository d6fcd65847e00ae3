"""Options shared by several subcommands, declared once.

Command modules import only typer, rich and this module at import time, so that `moeprof --help` and
every command start fast; a command imports the library it needs when it runs. The choice lists
below are spelled out here for the same reason; tests/test_cli_consistency.py checks them against the
library's registries.
"""

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

# Registries of the library (checked equal in tests): placement.policies.POLICIES,
# placement.grouping.GROUPINGS, placement.export.EXPORTERS, importers.FORMATS,
# analysis.run.DEFAULT_BATCH_SIZES.
POLICY_NAMES = ("linear", "round_robin", "eplb", "kmeans", "locality")
GROUPING_NAMES = ("random", "domain", "prefill")
EXPORTER_NAMES = ("sglang", "trtllm", "deepseek")
IMPORT_FORMATS = ("sglang", "vllm", "megatron", "megatron-tpe", "jsonl", "counts")
DEFAULT_BATCH_SIZES = (1, 8, 64, 512, 4096)
