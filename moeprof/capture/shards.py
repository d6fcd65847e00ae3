"""One trace from many ranks: each rank writes its own sub-trace, a merged manifest lists them all.

A serving engine split over ranks (data parallel: each rank serves its own requests; pipeline
parallel: each stage runs its own layers) records on every rank that owns distinct rows. Each such
rank writes a complete trace of its own under ``ranks/<name>/`` with its own
:class:`~moeprof.trace.writer.TraceWriter` (no locks, no shared files), and after every flush
rewrites the merged top level under an exclusive file lock::

    trace/
      manifest.json               merged: every rank's routing shards, paths relative to trace/
      requests-<sha>.parquet      union of the ranks' requests (a request seen by several pipeline
                                  stages appears once; its token counts are the largest any stage saw),
                                  a new name per merge so a reader of the previous manifest still
                                  finds the file it lists (the one before that is deleted)
      ranks/dp0-pp0/              a complete trace of rank dp0-pp0 (manifest, requests, routing/)
      ranks/dp1-pp0/ ...

The merged manifest is ``complete`` only when every rank's is. Readers open ``trace/`` like any
trace; a single rank's directory is a valid trace too. Rank manifests are written atomically, so
the merge always sees finished shards only; a rank that died keeps what it flushed.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from moeprof.errors import TraceError
from moeprof.trace.manifest import Manifest, ModelInfo, Shard, read_manifest, write_json_atomic
from moeprof.trace.schema import MANIFEST_FILE
from moeprof.trace.writer import _write_parquet_atomic

RANKS_DIR = "ranks"
LOCK_FILE = ".moeprof-merge.lock"


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def rank_dirs(root: Path) -> list[Path]:
    """Rank sub-traces under ``root/ranks`` that have written a manifest, in name order."""
    base = Path(root) / RANKS_DIR
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if (p / MANIFEST_FILE).exists())


def merge_ranks(root: str | Path) -> Manifest:
    """Rewrite ``root/manifest.json`` and ``root/requests.parquet`` from the rank sub-traces."""
    root = Path(root)
    with _locked(root):
        ranks = rank_dirs(root)
        if not ranks:
            raise TraceError(f"{root}: no rank traces under {RANKS_DIR}/ to merge")
        manifests = [(r, read_manifest(r)) for r in ranks]
        merged = _merged_manifest(root, manifests)
        requests = _merged_requests([r for r, _ in manifests], manifests)
        previous = _listed_requests(root)
        # A new name per version: a reader holding the previous manifest still finds its file.
        pending = _write_parquet_atomic(requests, root / ".requests.pending.parquet")
        name = f"requests-{pending.sha256[:16]}.parquet"
        os.replace(root / ".requests.pending.parquet", root / name)
        pending.path, pending.kind = name, "requests"
        merged.shards.append(pending)
        write_json_atomic(root / MANIFEST_FILE, merged.to_dict())
        for old in root.glob("requests-*.parquet"):
            if old.name not in (name, previous):
                old.unlink(missing_ok=True)
        return merged


def _listed_requests(root: Path) -> str | None:
    try:
        shards = read_manifest(root).shards_of("requests")
    except TraceError:
        return None
    return shards[0].path if shards else None


def _merged_manifest(root: Path, manifests: list[tuple[Path, Manifest]]) -> Manifest:
    first = manifests[0][1]
    layers = sorted({int(x) for _, m in manifests for x in m.model.moe_layers})
    model = ModelInfo.from_dict({**first.model.to_dict(), "moe_layers": layers})
    if model.num_layers:
        # Pipeline stages each know their own layers; every layer lives on some stage.
        model.dense_layers = sorted(set(range(model.num_layers)) - set(layers))
    for path, m in manifests[1:]:
        if (m.model.num_experts, m.model.top_k) != (first.model.num_experts, first.model.top_k):
            raise TraceError(
                f"{path}: {m.model.num_experts} experts top-{m.model.top_k}, but {manifests[0][0]} has "
                f"{first.model.num_experts} top-{first.model.top_k}; these ranks are not one model"
            )
    shards: list[Shard] = []
    for path, m in manifests:
        rel = path.relative_to(root).as_posix()
        for s in m.shards:
            if s.kind != "requests":
                shards.append(Shard(f"{rel}/{s.path}", s.kind, s.rows, s.bytes, s.sha256))
    capture = {k: v for k, v in first.capture.items() if k != "rank"}
    capture["ranks"] = {path.name: m.capture.get("rank", {}) for path, m in manifests}
    # A note every rank makes is said once; a rank's own note names the rank.
    common = set.intersection(*(set(m.notes) for _, m in manifests))
    notes = [n for n in first.notes if n in common]
    for path, m in manifests:
        notes += [f"{path.name}: {n}" for n in m.notes if n not in common]
    return Manifest(
        source=first.source,
        model=model,
        complete=all(m.complete for _, m in manifests),
        shards=shards,
        capture=capture,
        missing=dict(first.missing),
        notes=notes,
        created_at=min(m.created_at for _, m in manifests),
    )


def _merged_requests(paths: list[Path], manifests: list[tuple[Path, Manifest]]) -> pa.Table:
    tables = []
    for path, m in manifests:
        for s in m.shards_of("requests"):
            tables.append(pq.read_table(path / s.path))
    if not tables:
        raise TraceError(f"{paths[0].parent}: the rank traces list no requests table")
    table = pa.concat_tables(tables, promote_options="default")
    # A request on several pipeline stages: one row, the largest counts (a stage may lag a flush).
    frame = pl.from_arrow(table)
    if frame.height:
        aggs = [
            pl.col(c).max() if c in ("prompt_tokens", "decode_tokens") else pl.col(c).first()
            for c in frame.columns
            if c != "request_id"
        ]
        frame = frame.group_by("request_id", maintain_order=True).agg(aggs).sort("request_id")
    return frame.to_arrow().cast(table.schema)

