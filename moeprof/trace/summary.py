"""A short description of a trace: what ``moeprof inspect`` prints and ``report`` leads with."""

from __future__ import annotations

from typing import Any

import polars as pl

from moeprof.trace.reader import Trace


def describe(trace: Trace) -> dict[str, Any]:
    """Model, source, requests per domain, tokens per phase, rows and size of ``trace``.

    Tokens are counted at the first MoE layer present, so a token is counted once however many
    MoE layers it crossed.
    """
    m = trace.manifest
    requests = trace.requests()
    per_domain = (
        requests.group_by("domain").agg(pl.len().alias("requests")).sort("domain").to_dicts()
        if requests.height
        else []
    )
    tokens: dict[str, int] = {}
    layers_seen: list[int] = []
    if trace.num_routing_rows:
        layer_rows = trace.routing(["layer"]).group_by("layer").agg(pl.len()).sort("layer").collect()
        layers_seen = layer_rows["layer"].to_list()
        first = layers_seen[0]
        by_phase = (
            trace.routing(["layer", "phase"])
            .filter(pl.col("layer") == first)
            .group_by("phase")
            .agg(pl.len().alias("n"))
            .collect()
        )
        tokens = {str(r["phase"]): int(r["n"]) for r in by_phase.to_dicts()}
    loads = trace.loads()
    load_routes = None
    if loads is not None:
        load_routes = int(loads.select(pl.col("count").sum()).collect().item() or 0)
    return {
        "path": str(trace.path),
        "format_version": m.format_version,
        "moeprof_version": m.moeprof_version,
        "created_at": m.created_at,
        "source": m.source,
        "complete": m.complete,
        "model": m.model.to_dict(),
        "requests": int(requests.height),
        "requests_per_domain": {d["domain"]: int(d["requests"]) for d in per_domain},
        "tokens_per_phase": tokens,
        "routing_rows": trace.num_routing_rows,
        "layers_with_rows": layers_seen,
        "load_token_routes": load_routes,
        "shards": len(m.shards),
        "size_bytes": trace.size_bytes,
        "bytes_per_token_layer": (
            sum(s.bytes for s in m.shards_of("routing")) / trace.num_routing_rows
            if trace.num_routing_rows
            else None
        ),
        "missing": dict(m.missing),
        "notes": list(m.notes),
        "capture": dict(m.capture),
    }
