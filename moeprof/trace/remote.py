"""A trace on object storage or a shared filesystem (``s3://``, ``gs://``, ``hdfs://``, ``file://``).

Same checks as a local :class:`~moeprof.trace.reader.Trace`, read through ``pyarrow.fs``: the manifest,
then each listed shard's size, footer row count and schema (``verify="full"`` also hashes each one).
``path`` is the URI string (``pathlib`` would fold ``s3://`` into ``s3:/``) and ``shard_paths`` gives
URIs, which :func:`moeprof.trace.fs.parquet_file` opens wherever the reader runs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Iterable

import polars as pl
import pyarrow as pa

from moeprof.errors import TraceError, TraceIntegrityError
from moeprof.trace import fs
from moeprof.trace.manifest import Manifest, Shard
from moeprof.trace.reader import Trace
from moeprof.trace.schema import LOADS_SCHEMA, MANIFEST_FILE, REQUESTS_SCHEMA, SOURCES, check_schema, routing_schema


def read_remote_manifest(location: str) -> Manifest:
    where = str(fs.join(location, MANIFEST_FILE))
    exists, _ = fs.file_info(where)
    if not exists:
        raise TraceError(f"{where}: not found; {location} is not a moeprof trace (or its capture wrote nothing yet)")
    try:
        data = json.loads(fs.read_bytes(where).decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if not isinstance(data, dict):
        raise TraceError(f"{where}: expected a JSON object")
    manifest = Manifest.from_dict(data, where=where)
    if manifest.source not in SOURCES:
        raise TraceError(f"{where}: unknown source {manifest.source!r} (known: {', '.join(SOURCES)})")
    return manifest


class RemoteTrace(Trace):
    """A trace addressed by URI; see the module docstring."""

    def __init__(self, location: str, manifest: Manifest) -> None:
        self.path = location.rstrip("/")  # type: ignore[assignment]  # a URI, not a local Path
        self.manifest = manifest

    @classmethod
    def open(cls, path, *, verify="rows") -> "RemoteTrace":  # type: ignore[override]
        trace = cls(str(path), read_remote_manifest(str(path)))
        if verify != "none":
            trace.verify(full=verify == "full")
        return trace

    def shard_paths(self, kind: str) -> list[str]:  # type: ignore[override]
        return [str(fs.join(self.path, s.path)) for s in self.manifest.shards_of(kind)]

    def verify(self, full: bool = False, progress: Callable[[Shard], None] | None = None) -> None:
        expected = {"routing": routing_schema(self.model.top_k), "loads": LOADS_SCHEMA, "requests": REQUESTS_SCHEMA}
        for shard in self.manifest.shards:
            where = str(fs.join(self.path, shard.path))
            exists, size = fs.file_info(where)
            if not exists:
                raise TraceIntegrityError(f"{where}: listed in the manifest but missing")
            if size != shard.bytes:
                raise TraceIntegrityError(
                    f"{where}: {size} bytes, the manifest says {shard.bytes}; the file was truncated or altered"
                )
            try:
                pf = fs.parquet_file(where)
            except (pa.ArrowInvalid, OSError) as exc:
                raise TraceIntegrityError(f"{where}: not a readable Parquet file ({exc})") from None
            if pf.metadata.num_rows != shard.rows:
                raise TraceIntegrityError(f"{where}: {pf.metadata.num_rows} rows, the manifest says {shard.rows}")
            if shard.kind in expected:
                try:
                    check_schema(pf.schema_arrow, expected[shard.kind], where)
                except Exception as exc:  # TraceError -> integrity, with the same message
                    raise TraceIntegrityError(str(exc)) from None
            if full:
                digest = hashlib.sha256(fs.read_bytes(where)).hexdigest()
                if digest != shard.sha256:
                    raise TraceIntegrityError(
                        f"{where}: sha256 {digest[:12]}… differs from the manifest's {shard.sha256[:12]}…; "
                        "the file was altered after capture"
                    )
            if progress is not None:
                progress(shard)

    # polars reads local paths itself; remote shards are read through pyarrow.fs and handed over.
    def _frame(self, kind: str, columns: list[str] | None = None) -> pl.DataFrame | None:
        paths = self.shard_paths(kind)
        if not paths:
            return None
        return pl.from_arrow(pa.concat_tables([fs.read_table(p, columns) for p in paths]))

    def routing(self, columns: Iterable[str] | None = None) -> pl.LazyFrame:
        cols = list(columns) if columns is not None else None
        frame = self._frame("routing", cols)
        if frame is None:
            frame = pl.from_arrow(routing_schema(self.model.top_k).empty_table())
            frame = frame.select(cols) if cols is not None else frame
        return frame.lazy()

    def requests(self) -> pl.DataFrame:
        frame = self._frame("requests")
        return frame if frame is not None else pl.from_arrow(REQUESTS_SCHEMA.empty_table())

    def loads(self) -> pl.LazyFrame | None:
        frame = self._frame("loads")
        return frame.lazy() if frame is not None else None

