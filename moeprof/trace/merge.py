"""Merge traces written by many ranks or captures into one, without copying a routing row.

The merged trace is a directory holding a new ``manifest.json`` and ``requests.parquet`` (one row per
request, the union of the sources'); its routing and count shards stay where they are and are listed
by paths relative to the merged trace (``../rank1/routing/part-00000.parquet``), with the rows,
bytes and sha256 the sources recorded. Every reader resolves them like its own shards.

What cannot be merged without rewriting rows is refused or marked, never guessed:

* different models (experts, top-k, MoE layers) or sources: refused;
* a request id in two sources: refused (request ids join routing rows to requests; give each rank
  its own id range at capture time);
* forward-pass ids (``batch_id``) whose ranges overlap across sources: two ranks' passes would read
  as one, so the merged trace records ``batch_id`` as missing and batch statistics sample tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from moeprof.errors import TraceError, UsageError
from moeprof.trace.fs import is_uri, parquet_file
from moeprof.trace.manifest import Manifest, Shard, write_json_atomic
from moeprof.trace.reader import Trace
from moeprof.trace.schema import MANIFEST_FILE, REQUESTS_FILE, REQUESTS_SCHEMA
from moeprof.trace.writer import _write_parquet_atomic, prepare_output_dir


def merge_traces(sources: Sequence[str | Path], out: str | Path, *, force: bool = False) -> Manifest:
    """Write a trace at ``out`` that lists the shards of every trace in ``sources``; return its manifest."""
    if len(sources) < 2:
        raise UsageError("merge needs two or more traces")
    for s in list(sources) + [out]:
        if is_uri(str(s)):
            raise UsageError(f"{s}: merge reads and writes local (or mounted) directories; "
                             "merge beside the traces, then copy the merged manifest next to them")
    out = Path(out)
    traces = [Trace.open(s, verify="rows") for s in sources]
    _check_out(out, [t.path for t in traces])
    first = traces[0]
    for t in traces[1:]:
        _check_same(first, t)
    requests = pl.concat([t.requests() for t in traces], how="vertical_relaxed").sort("request_id")
    ids = requests["request_id"].to_numpy()
    if ids.size and (np.diff(ids) == 0).any():
        rid = int(ids[1:][np.diff(ids) == 0][0])
        holders = [str(t.path) for t in traces if rid in set(t.requests()["request_id"].to_list())]
        raise TraceError(
            f"request id {rid} is in {' and '.join(holders)}: merged traces need distinct request ids "
            "(give each rank or capture its own id range)"
        )
    missing: dict[str, str] = {}
    notes: list[str] = []
    for t in traces:
        for cap, why in t.manifest.missing.items():
            missing.setdefault(cap, f"{why} (in {t.path})")
        notes += [n for n in t.manifest.notes if n not in notes]
    if "batch_id" not in missing and _batch_ranges_overlap(traces):
        missing["batch_id"] = (f"merged from {len(traces)} traces whose forward-pass ids (batch_id) overlap; "
                               "passes of different ranks cannot be told apart")
    prepare_output_dir(out, force)
    shards = []
    for t in traces:
        for s in t.manifest.shards:
            if s.kind == "requests":
                continue
            rel = os.path.relpath(Path(t.path) / s.path, out).replace(os.sep, "/")
            shards.append(Shard(path=rel, kind=s.kind, rows=s.rows, bytes=s.bytes, sha256=s.sha256,
                                request_ids=s.request_ids))
    table = requests.to_arrow().select(REQUESTS_SCHEMA.names).cast(REQUESTS_SCHEMA)
    req = _write_parquet_atomic(table, out / REQUESTS_FILE)
    req.path, req.kind = REQUESTS_FILE, "requests"
    manifest = Manifest(
        source=first.manifest.source,
        model=first.model,
        complete=all(t.complete for t in traces),
        shards=shards + [req],
        capture=dict(merged_from=[
            dict(trace=os.path.relpath(t.path, out).replace(os.sep, "/"), complete=t.complete,
                 created_at=t.manifest.created_at, capture=t.manifest.capture) for t in traces
        ]),
        missing=missing,
        notes=notes + [f"merged from {len(traces)} traces by `moeprof merge`; shards stay in their traces"],
    )
    write_json_atomic(out / MANIFEST_FILE, manifest.to_dict())
    return manifest


def _check_out(out: Path, sources: list[Path]) -> None:
    """Refuse an output that is, or holds, a source (``--force`` would delete it)."""
    o = out.resolve()
    for src in sources:
        s = Path(src).resolve()
        if o == s or o in s.parents:
            raise UsageError(f"--out {out} is or holds the source trace {src}; choose another directory")


def _check_same(a: Trace, b: Trace) -> None:
    ma, mb = a.model, b.model
    for field in ("num_experts", "top_k", "moe_layers"):
        if getattr(ma, field) != getattr(mb, field):
            raise TraceError(f"{a.path} and {b.path} are of different models ({field}: {getattr(ma, field)} "
                             f"and {getattr(mb, field)}); only traces of one model merge")
    if a.manifest.source != b.manifest.source:
        raise TraceError(f"{a.path} (source {a.manifest.source}) and {b.path} (source {b.manifest.source}) "
                         "were recorded by different tools; merge traces of one source")


def _batch_ranges_overlap(traces: list[Trace]) -> bool:
    """True if two sources' ``batch_id`` ranges (from Parquet footers) overlap, or cannot be told."""
    ranges = []
    for t in traces:
        lo, hi = None, None
        for path in t.shard_paths("routing"):
            meta = parquet_file(path).metadata
            if "batch_id" not in meta.schema.names:
                continue
            col = meta.schema.names.index("batch_id")
            for i in range(meta.num_row_groups):
                stats = meta.row_group(i).column(col).statistics
                if stats is None or not stats.has_min_max:
                    if stats is not None and stats.null_count == meta.row_group(i).num_rows:
                        continue  # all null: no pass ids here
                    return True
                lo = stats.min if lo is None else min(lo, stats.min)
                hi = stats.max if hi is None else max(hi, stats.max)
        if lo is not None:
            ranges.append((lo, hi))
    ranges.sort()
    return any(b[0] <= a[1] for a, b in zip(ranges, ranges[1:]))
