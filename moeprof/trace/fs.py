"""Where a trace lives: a local directory or a URI that ``pyarrow.fs`` resolves (``s3://``, ``gs://``,
``hdfs://``, ``file://``).

A trace on object storage is read the same way as a local one: the manifest names every shard by a
path relative to the trace, so nothing ever lists a bucket; each reader (a thread, or a Ray task on
another machine) opens the shards it needs directly. Local paths stay :class:`pathlib.Path` and take
the plain code path; only strings of the form ``scheme://...`` go through ``pyarrow.fs``.
"""

from __future__ import annotations

import functools
import posixpath
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from moeprof.errors import TraceError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: Any) -> bool:
    """True for ``scheme://...`` strings (a trace on a ``pyarrow.fs`` filesystem), false for local paths."""
    return isinstance(location, str) and bool(_URI.match(location))


def join(location: str | Path, relative: str) -> str | Path:
    """``location`` / ``relative``, keeping a URI's query string (``?region=...``) at the end."""
    if not is_uri(location):
        return Path(location) / relative
    base, sep, query = str(location).partition("?")
    scheme, _, rest = base.partition("://")
    bucket, _, path = rest.partition("/")
    # a merged trace lists shards as ../other/...; object stores do not resolve "..", so do it here
    path = posixpath.normpath(posixpath.join("/" + path, relative)).lstrip("/")
    return f"{scheme}://{bucket}/{path}{sep}{query}"


@functools.lru_cache(maxsize=64)
def _filesystem(prefix: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(prefix)


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The ``pyarrow.fs`` filesystem of a URI and the path inside it (filesystems are cached per bucket)."""
    try:
        base, sep, query = location.partition("?")
        scheme, _, rest = base.partition("://")
        bucket, slash, path = rest.partition("/")
        if scheme == "file":  # file:///abs/path: the local filesystem through pyarrow.fs
            if bucket:
                raise ValueError("file:// URIs name no host; write file:///absolute/path")
            return _filesystem("file:///")[0], "/" + path
        fs, root = _filesystem(f"{scheme}://{bucket}/{sep}{query}")
        return fs, (root.rstrip("/") + "/" + path) if path else root
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
        raise TraceError(f"{location}: cannot open this location through pyarrow.fs ({exc})") from None


def file_info(location: str | Path) -> tuple[bool, int]:
    """(exists, size in bytes) of one file."""
    if not is_uri(location):
        path = Path(location)
        return (True, path.stat().st_size) if path.is_file() else (False, 0)
    fs, path = resolve(str(location))
    info = fs.get_file_info(path)
    return info.type == pafs.FileType.File, int(info.size or 0)


def read_bytes(location: str | Path) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = resolve(str(location))
    with fs.open_input_stream(path) as fh:
        return fh.read()


def parquet_file(location: str | Path) -> pq.ParquetFile:
    """A Parquet file by local path or URI (the file stays open for row-group reads)."""
    if not is_uri(location):
        return pq.ParquetFile(location)
    fs, path = resolve(str(location))
    return pq.ParquetFile(fs.open_input_file(path))


def read_table(location: str | Path, columns: list[str] | None = None) -> pa.Table:
    if not is_uri(location):
        return pq.read_table(location, columns=columns)
    return parquet_file(location).read(columns=columns)
