"""Open a trace directory, check it against its manifest, and hand out lazy polars frames.

Checks on open (``verify="rows"``, the default) read only Parquet footers: every shard listed in the
manifest exists, has the recorded size and row count, and the schema of format v1. ``verify="full"``
also recomputes every sha256 (what ``moeprof inspect`` does). Files in the directory that the
manifest does not list (a shard finished after the last manifest of a killed capture) are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Literal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from moeprof.errors import TraceIntegrityError
from moeprof.trace.manifest import Manifest, ModelInfo, Shard, read_manifest
from moeprof.trace.schema import (
    IMPORTED_SOURCES,
    LEGACY_UNLABELLED,
    LOADS_SCHEMA,
    REQUESTS_SCHEMA,
    UNLABELLED,
    check_schema,
    routing_schema,
)
from moeprof.trace.writer import sha256_file

Verify = Literal["none", "rows", "full"]


class Trace:
    """A validated trace directory. Open it with :meth:`Trace.open`."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, *, verify: Verify = "rows") -> "Trace":
        from moeprof.trace.fs import is_uri

        if is_uri(str(path)):  # s3://, gs://, hdfs://, file://: read through pyarrow.fs
            from moeprof.trace.remote import RemoteTrace

            return RemoteTrace.open(str(path), verify=verify)
        trace = cls(Path(path), read_manifest(Path(path)))
        if verify != "none":
            trace.verify(full=verify == "full")
        return trace

    # -- what the trace is --------------------------------------------------------------------
    @property
    def model(self) -> ModelInfo:
        return self.manifest.model

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    @property
    def has_per_token(self) -> bool:
        return bool(self.manifest.shards_of("routing")) or (
            self.manifest.has("per_token") and not self.manifest.shards_of("loads")
        )

    @property
    def num_routing_rows(self) -> int:
        return sum(s.rows for s in self.manifest.shards_of("routing"))

    @property
    def size_bytes(self) -> int:
        return sum(s.bytes for s in self.manifest.shards)

    def shard_paths(self, kind: str) -> list[Path]:
        return [self.path / s.path for s in self.manifest.shards_of(kind)]

    # -- integrity ----------------------------------------------------------------------------
    def verify(self, full: bool = False, progress: Callable[[Shard], None] | None = None) -> None:
        """Raise :class:`TraceIntegrityError` naming the first shard that disagrees with the manifest."""
        expected = {
            "routing": routing_schema(self.model.top_k),
            "loads": LOADS_SCHEMA,
            "requests": REQUESTS_SCHEMA,
        }
        for shard in self.manifest.shards:
            path = self.path / shard.path
            if not path.exists():
                raise TraceIntegrityError(f"{path}: listed in the manifest but missing")
            size = path.stat().st_size
            if size != shard.bytes:
                raise TraceIntegrityError(
                    f"{path}: {size} bytes on disk, the manifest says {shard.bytes}; "
                    "the file was truncated or altered"
                )
            try:
                meta = pq.read_metadata(path)
                schema = pq.read_schema(path)
            except (pa.ArrowInvalid, OSError) as exc:
                raise TraceIntegrityError(f"{path}: not a readable Parquet file ({exc})") from None
            if meta.num_rows != shard.rows:
                raise TraceIntegrityError(
                    f"{path}: {meta.num_rows} rows, the manifest says {shard.rows}"
                )
            if shard.kind in expected:
                try:
                    check_schema(schema, expected[shard.kind], str(path))
                except Exception as exc:  # TraceError -> integrity, with the same message
                    raise TraceIntegrityError(str(exc)) from None
            if full:
                digest = sha256_file(path)
                if digest != shard.sha256:
                    raise TraceIntegrityError(
                        f"{path}: sha256 {digest[:12]}… differs from the manifest's {shard.sha256[:12]}…; "
                        "the file was altered after capture"
                    )
            if progress is not None:
                progress(shard)

    # -- data ---------------------------------------------------------------------------------
    def routing(self, columns: Iterable[str] | None = None) -> pl.LazyFrame:
        """All routing rows as a lazy frame (``experts``/``weights`` are polars ``Array`` columns)."""
        paths = self.shard_paths("routing")
        if not paths:
            frame = pl.from_arrow(routing_schema(self.model.top_k).empty_table()).lazy()
        else:
            frame = pl.scan_parquet([str(p) for p in paths])
        if columns is not None:
            frame = frame.select(list(columns))
        return frame

    def routing_batches(self, columns: Iterable[str] | None = None) -> Iterable[pa.RecordBatch]:
        """Routing rows shard by shard, row group by row group (bounded memory), as Arrow batches."""
        cols = list(columns) if columns is not None else None
        for path in self.shard_paths("routing"):
            pf = pq.ParquetFile(path)
            for i in range(pf.num_row_groups):
                yield from pf.read_row_group(i, columns=cols).to_batches()

    def requests(self) -> pl.DataFrame:
        paths = self.shard_paths("requests")
        if not paths:
            return pl.from_arrow(REQUESTS_SCHEMA.empty_table())
        return self._unlabelled(pl.read_parquet(paths[0]))

    def loads(self) -> pl.LazyFrame | None:
        """Count tables (sources without per-token rows), or ``None`` if the trace has none."""
        paths = self.shard_paths("loads")
        if not paths:
            return None
        return self._unlabelled(pl.scan_parquet([str(p) for p in paths]))

    def _unlabelled(self, frame):
        """Old imports wrote "unknown" for a request without a domain; say "unlabelled" as capture does."""
        if self.manifest.source not in IMPORTED_SOURCES:
            return frame
        domain = pl.col("domain")
        return frame.with_columns(
            pl.when(domain == LEGACY_UNLABELLED).then(pl.lit(UNLABELLED)).otherwise(domain).alias("domain")
        )
