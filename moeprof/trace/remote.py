"""A trace on object storage or a shared filesystem (``s3://``, ``gs://``, ``hdfs://``, ``file://``).

Same checks as a local :class:`~moeprof.trace.reader.Trace`, read through ``pyarrow.fs``: on open the
manifest, then each listed shard's size, footer row count and schema (``verify="full"`` also hashes
each one); every read of shard data is then checked against the manifest's size and sha256, as
locally. ``path`` is the URI string (``pathlib`` would fold ``s3://`` into ``s3:/``) and ``shard_paths``
gives URIs, which :func:`moeprof.trace.fs.read_bytes` opens wherever the reader runs (a thread here,
a Ray task on another node).
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import pyarrow as pa

from moeprof.errors import TraceError, TraceIntegrityError
from moeprof.trace import fs
from moeprof.trace.manifest import Manifest, Shard
from moeprof.trace.reader import Trace, check_shard
from moeprof.trace.schema import LOADS_SCHEMA, MANIFEST_FILE, REQUESTS_SCHEMA, SOURCES, routing_schema


def read_remote_manifest(location: str) -> Manifest:
    where = str(fs.join(location, MANIFEST_FILE))
    exists, _ = fs.file_info(where)
    if not exists:
        raise TraceError(f"{where}: not found; {location} is not a moeprof trace (or its capture wrote nothing yet)")
    try:
        data = json.loads(fs.read_bytes(where).decode("utf-8"))
    except FileNotFoundError:  # deleted between the two requests
        raise TraceError(f"{where}: not found; {location} is not a moeprof trace") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise TraceError(f"{where}: not valid JSON{line}: {getattr(exc, 'msg', exc)}") from None
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
        # Reads are always checked: a remote shard is fetched whole anyway, and hashing it costs
        # little next to the transfer. Reader methods look shards up by this URI.
        self.check_reads = True
        self._by_path = {str(fs.join(self.path, s.path)): s for s in manifest.shards}

    @classmethod
    def open(cls, path, *, verify="rows", check_reads=None) -> "RemoteTrace":  # type: ignore[override]
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
            except FileNotFoundError:
                raise TraceIntegrityError(f"{where}: listed in the manifest but missing") from None
            except (pa.ArrowInvalid, OSError) as exc:
                raise TraceIntegrityError(f"{where}: not a readable Parquet file ({exc})") from None
            check_shard(shard, where, pf.metadata.num_rows, pf.schema_arrow, expected,
                        (lambda: hashlib.sha256(fs.read_bytes(where)).hexdigest()) if full else None)
            if progress is not None:
                progress(shard)
