"""Where a trace lives: a local directory or a URI that ``pyarrow.fs`` resolves (``s3://``, ``gs://``,
``hdfs://``, ``file://``).

A trace on object storage is read the same way as a local one: the manifest names every shard by a
path relative to the trace, so nothing ever lists a bucket; each reader (a thread, or a Ray task on
another machine) opens the shards it needs directly. Local paths stay :class:`pathlib.Path` and take
the plain code path; only strings of the form ``scheme://...`` go through ``pyarrow.fs``.

Endpoints and credentials are ``pyarrow.fs``'s, read by every process that opens a URI (so on every
Ray node): for ``s3://`` the AWS variables (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``, ``AWS_REGION``) or the URI's query
(``?endpoint_override=HOST:PORT&scheme=http&region=...``); for ``gs://`` Google's default credentials,
``gs://anonymous@BUCKET/...`` for none, and the same query keys. A store that fails (unreachable,
credentials refused, libhdfs missing) raises a :class:`TraceError` naming the URI and what to check;
a missing object stays ``FileNotFoundError``, so that the reader can name the manifest entry.
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

from moeprof.errors import TraceError, TraceIntegrityError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# What to check when a store refuses or cannot be reached, by scheme.
_HINTS = {
    "s3": "check the endpoint (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, or ?endpoint_override=HOST:PORT&scheme=http), "
          "the region (AWS_REGION) and the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)",
    "gs": "check the endpoint (?endpoint_override=HOST:PORT&scheme=http) and the credentials "
          "(GOOGLE_APPLICATION_CREDENTIALS; gs://anonymous@BUCKET/... reads public data without any)",
    "hdfs": "check the namenode's host and port in the URI, and that it runs",
}
_HINTS["gcs"] = _HINTS["gs"]

# pyarrow's HadoopFileSystem loads libhdfs and a JVM when first used, and its error lists every
# directory it tried: say instead what to install.
_NO_LIBHDFS = (
    "hdfs:// needs Hadoop's libhdfs and a Java runtime, which pyarrow could not load ({why}); install a JDK "
    "and Hadoop, then set JAVA_HOME, HADOOP_HOME (or ARROW_LIBHDFS_DIR, the directory of libhdfs.so) and "
    "CLASSPATH=$(hadoop classpath --glob), as pyarrow's HadoopFileSystem documents"
)


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


def store_error(location: str, exc: BaseException, doing: str = "cannot be read") -> TraceError:
    """A :class:`TraceError` for a store that failed on ``location``: the URI, the first line of the
    store's own message, and what to check."""
    scheme = location.partition("://")[0].lower()
    text = str(exc).strip()
    why = text.splitlines()[0] if text else type(exc).__name__
    if scheme in ("hdfs", "viewfs") and ("libjvm" in text or "libhdfs" in text):
        return TraceError(f"{location}: " + _NO_LIBHDFS.format(why=why))
    hint = _HINTS.get(scheme)
    return TraceError(f"{location}: {doing} ({why})" + (f"; {hint}" if hint else ""))


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
        raise store_error(location, exc, "cannot open this location through pyarrow.fs") from None


def file_info(location: str | Path) -> tuple[bool, int]:
    """(exists, size in bytes) of one file."""
    if not is_uri(location):
        path = Path(location)
        return (True, path.stat().st_size) if path.is_file() else (False, 0)
    fs, path = resolve(str(location))
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise store_error(str(location), exc) from None
    return info.type == pafs.FileType.File, int(info.size or 0)


def read_bytes(location: str | Path) -> bytes:
    """The whole file; a missing one raises ``FileNotFoundError``, local or remote."""
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = resolve(str(location))
    try:
        # a file, not a stream: its size is known, so the store serves it in one request, not in
        # the stream's 256 KiB pieces
        with fs.open_input_file(path) as fh:
            return fh.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise store_error(str(location), exc) from None


def parquet_file(location: str | Path) -> pq.ParquetFile:
    """A Parquet file by local path or URI (the file stays open for row-group reads)."""
    if not is_uri(location):
        return pq.ParquetFile(location)
    fs, path = resolve(str(location))
    try:
        handle = fs.open_input_file(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise store_error(str(location), exc) from None
    return pq.ParquetFile(handle)


def checked_parquet(location: str | Path, sha256: str) -> pq.ParquetFile:
    """A shard read whole and checked against its manifest sha256 before any decoding (a flipped byte
    inside a compressed page can decode to valid-looking expert ids), opened from those bytes.
    Raises :class:`TraceIntegrityError` naming ``location``."""
    import hashlib

    try:
        data = read_bytes(location)
    except OSError as exc:
        raise TraceIntegrityError(f"{location}: cannot be read ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise TraceIntegrityError(f"{location}: sha256 {digest[:12]}… differs from the manifest's {sha256[:12]}…; "
                                  "the shard is corrupt or was altered after capture")
    try:
        return pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise TraceIntegrityError(f"{location}: not a readable Parquet file ({exc}); the shard is corrupt") from None


def read_table(location: str | Path, columns: list[str] | None = None) -> pa.Table:
    if not is_uri(location):
        return pq.read_table(location, columns=columns)
    return parquet_file(location).read(columns=columns)
