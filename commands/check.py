"""`moeprof check`: gate a build on routing thresholds; exit 0 if every rule holds, 1 if one fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeprof.commands.options import JsonFlag
from moeprof.report.console import console


def check(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="summary.json, an analyze/simulate output directory, or a trace (analysed on the fly; a "
                 "directory or an s3://, gs://, hdfs://, file:// URI).",
            show_default=False,
        ),
    ],
    rules: Annotated[Optional[Path], typer.Option("--rules", "-r", help="TOML rules file: a list of rule tables, see docs/rules.example.toml.")] = None,
    max_imbalance: Annotated[
        Optional[float], typer.Option(help="Busiest expert / mean expert load, in every MoE layer.")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option(min=1, help="With --max-imbalance: over batches of this many tokens (p90).")
    ] = None,
    max_dead_experts: Annotated[Optional[int], typer.Option(help="Experts with no token, per layer.")] = None,
    max_domain_js: Annotated[
        Optional[float], typer.Option(help="Largest JS divergence between two domains, per layer.")
    ] = None,
    min_prefill_decode_corr: Annotated[
        Optional[float], typer.Option(help="Aggregate prefill→decode Pearson correlation, per layer.")
    ] = None,
    max_cross_node_bytes: Annotated[
        Optional[float], typer.Option(help="Cross-node bytes per token of the placement (held-out requests).")
    ] = None,
    max_gpu_imbalance: Annotated[
        Optional[float], typer.Option(help="Busiest GPU / mean GPU load of the placement.")
    ] = None,
    policy: Annotated[
        Optional[str], typer.Option(help="Placement policy the placement limits apply to (in a --compare result).")
    ] = None,
    as_json: JsonFlag = False,
) -> int:
    """Check routing statistics against limits; exit 1 listing every value that breaks one.

    Limits come from a rules file (see docs/rules.example.toml) and/or the --max-*/--min-* options.
    Exit codes: 0 every rule holds, 1 a rule fails, 2 the inputs or rules are wrong.

    Example:

        moeprof check out/analysis --max-imbalance 4 --min-prefill-decode-corr 0.5

        moeprof check out/ --rules rules.toml
    """
    from moeprof.report.rules import check as run_check
    from moeprof.report.rules import load_rules, rule_from_option
    from moeprof.report.terminal import render_check

    chosen = load_rules(rules) if rules is not None else []
    options = [
        ("imbalance", "max", max_imbalance, "--max-imbalance", {"batch_size": batch_size, "stat": "p90"}
         if batch_size else {}),
        ("dead_experts", "max", max_dead_experts, "--max-dead-experts", {}),
        ("domain_js", "max", max_domain_js, "--max-domain-js", {}),
        ("prefill_decode_corr", "min", min_prefill_decode_corr, "--min-prefill-decode-corr", {}),
        ("cross_node_bytes", "max", max_cross_node_bytes, "--max-cross-node-bytes", {"policy": policy}),
        ("gpu_imbalance", "max", max_gpu_imbalance, "--max-gpu-imbalance", {"policy": policy}),
    ]
    for metric, side, limit, flag, params in options:
        if limit is not None:
            chosen.append(rule_from_option(metric, side, limit, flag, **params))
    result = run_check(inputs, chosen)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        render_check(result, console())
    return 0 if result.ok else 1

