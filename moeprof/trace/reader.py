"""Open a trace directory, check it against its manifest, and hand out lazy polars frames.

Checks on open (``verify="rows"``, the default) read only Parquet footers: every shard listed in the
manifest exists, has the recorded size and row count, and the schema of format v1. ``verify="full"``
also recomputes every sha256 (what ``moeprof inspect`` does). Files in the directory that the
manifest does not list (a shard finished after the last manifest of a killed capture) are ignored.

Every read of shard data is verified as it happens (``check_reads``, on unless opened with
``verify="none"``): a shard's bytes are read once, hashed, compared with the manifest's size and
sha256, and parsed from that same buffer, so a file altered after capture (even with its size
kept) is an error naming it, never a wrong number, and costs no second pass over the disk.
"""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from moeprof.errors import TraceError, TraceIntegrityError
from moeprof.text import format_ranges
from moeprof.trace import fs
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



def check_shard(shard: Shard, where: str, num_rows: int, schema: pa.Schema, expected: dict[str, pa.Schema],
                digest: Callable[[], str] | None) -> None:
    """What every reader checks of a shard it opened against its manifest entry (a local file or an
    object on a store): the row count, the schema of its kind and, when ``digest`` is given (a full
    verify), the sha256. Raises :class:`TraceIntegrityError` naming ``where``."""
    if num_rows != shard.rows:
        raise TraceIntegrityError(f"{where}: {num_rows} rows, the manifest says {shard.rows}")
    if shard.kind in expected:
        try:
            check_schema(schema, expected[shard.kind], where)
        except Exception as exc:  # TraceError -> integrity, with the same message
            raise TraceIntegrityError(str(exc)) from None
    if digest is not None:
        got = digest()
        if got != shard.sha256:
            raise TraceIntegrityError(
                f"{where}: sha256 {got[:12]}… differs from the manifest's {shard.sha256[:12]}…; "
                "the file was altered after capture"
            )

class Trace:
    """A validated trace directory. Open it with :meth:`Trace.open`."""

    # Defaults for subclasses that keep their own constructor (RemoteTrace reads through pyarrow.fs).
    check_reads: bool = False
    _by_path: dict = {}

    def __init__(self, path: Path, manifest: Manifest, *, check_reads: bool = True) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.check_reads = check_reads
        self._by_path = {str(self.path / s.path): s for s in manifest.shards}

    @classmethod
    def open(cls, path: str | Path, *, verify: Verify = "rows", check_reads: bool | None = None) -> "Trace":
        """Open and check a trace. ``check_reads`` (default: unless ``verify="none"``) verifies the
        sha256 of every shard as its data is read (local traces; a URI is read through pyarrow.fs)."""
        from moeprof.trace.fs import is_uri

        if is_uri(str(path)):  # s3://, gs://, hdfs://, file://: read through pyarrow.fs
            from moeprof.trace.remote import RemoteTrace

            return RemoteTrace.open(str(path), verify=verify)
        path = Path(path)
        if path.is_file():
            raise TraceError(
                f"{path}: is a file; give the trace directory (the one holding manifest.json)"
                + (f", here {path.parent}" if path.name == "manifest.json" else "")
            )
        trace = cls(path, read_manifest(path), check_reads=verify != "none" if check_reads is None else check_reads)
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
            check_shard(shard, str(path), meta.num_rows, schema, expected,
                        (lambda: sha256_file(path)) if full else None)
            if progress is not None:
                progress(shard)

    def check_ranges(self) -> None:
        """Raise :class:`TraceIntegrityError` when a shard's column statistics (min and max per row group,
        kept in its footer: nothing else is read) hold an expert id outside ``0..num_experts-1`` or a layer
        the manifest's MoE layers do not cover: a manifest that disagrees with its data, which
        :meth:`verify` (sizes, rows, checksums) cannot see. Shards written without statistics are passed."""
        moe = list(self.model.moe_layers)
        for kind in ("routing", "loads"):
            for path in self.shard_paths(kind):
                meta = fs.parquet_file(path).metadata
                for g in range(meta.num_row_groups):
                    for i in range(meta.num_columns):
                        col = meta.row_group(g).column(i)
                        name = col.path_in_schema.split(".")[0]
                        stats = col.statistics if col.is_stats_set else None
                        if name not in ("layer", "experts", "expert") or stats is None or not stats.has_min_max:
                            continue
                        lo, hi = int(stats.min), int(stats.max)
                        if name != "layer" and (lo < 0 or hi >= self.model.num_experts):
                            raise TraceIntegrityError(
                                f"{path} (row group {g}): expert ids run {lo}..{hi}, the manifest says "
                                f"{self.model.num_experts} experts; the trace is inconsistent with its model")
                        bad = [x for x in (lo, hi) if moe and x not in moe]
                        if name == "layer" and bad:
                            raise TraceIntegrityError(
                                f"{path} (row group {g}): layer {bad[0]} is not among the manifest's MoE layers "
                                f"({format_ranges(moe)}); the trace is inconsistent with its model")

    # -- reading shard data, verified ------------------------------------------------------------
    def shard_bytes(self, path: Path) -> bytes:
        """The bytes of the shard at ``path``, read once and checked against the manifest's size and
        sha256 (when :attr:`check_reads`); raises :class:`TraceIntegrityError` naming the file."""
        shard = self._by_path.get(str(path))
        try:
            data = fs.read_bytes(path)
        except FileNotFoundError:
            raise TraceIntegrityError(f"{path}: listed in the manifest but missing") from None
        if shard is None or not self.check_reads:
            return data
        if len(data) != shard.bytes:
            raise TraceIntegrityError(
                f"{path}: {len(data)} bytes on disk, the manifest says {shard.bytes}; the file was truncated or altered"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise TraceIntegrityError(
                f"{path}: sha256 {digest[:12]}… differs from the manifest's {shard.sha256[:12]}…; "
                "the file was altered after it was written: refusing to compute from it"
            )
        return data

    def parquet_file(self, path: Path) -> pq.ParquetFile:
        """A Parquet reader over the shard, parsed from its verified bytes (or the file itself when
        reads are not checked); its row count is checked against the manifest."""
        if not self.check_reads:
            return fs.parquet_file(path)
        return self._parse_shard(path, self.shard_bytes(path))

    def _parse_shard(self, path: Path, data: bytes) -> pq.ParquetFile:
        """A Parquet reader over ``data``, the verified bytes of shard ``path``; its row count checked."""
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise TraceIntegrityError(f"{path}: not a readable Parquet file ({exc})") from None
        shard = self._by_path.get(str(path))
        if shard is not None and pf.metadata.num_rows != shard.rows:
            raise TraceIntegrityError(f"{path}: {pf.metadata.num_rows} rows, the manifest says {shard.rows}")
        return pf

    def _frame(self, path: Path, columns: list[str] | None = None) -> pl.DataFrame:
        if not self.check_reads:
            return pl.read_parquet(path, columns=columns)
        data = self.shard_bytes(path)  # read once: size and sha256 checked, then parsed from memory
        try:
            frame = pl.read_parquet(io.BytesIO(data), columns=columns)
        except Exception as exc:  # polars raises its own error types for a corrupt file
            raise TraceIntegrityError(f"{path}: not a readable Parquet file ({exc})") from None
        shard = self._by_path.get(str(path))
        if shard is not None and frame.height != shard.rows:
            raise TraceIntegrityError(f"{path}: {frame.height} rows, the manifest says {shard.rows}")
        return frame

    # -- data ---------------------------------------------------------------------------------
    def routing(self, columns: Iterable[str] | None = None) -> pl.LazyFrame:
        """All routing rows as a lazy frame (``experts``/``weights`` are polars ``Array`` columns).

        With :attr:`check_reads` the shards are read (and verified) now and the frame is in memory."""
        paths = self.shard_paths("routing")
        cols = list(columns) if columns is not None else None
        if not paths:
            frame = pl.from_arrow(routing_schema(self.model.top_k).empty_table()).lazy()
        elif self.check_reads:
            frame = pl.concat([self._frame(p, cols) for p in paths]).lazy()
        else:
            frame = pl.scan_parquet([str(p) for p in paths])
        if cols is not None:
            frame = frame.select(cols)
        return frame

    def routing_batches(self, columns: Iterable[str] | None = None) -> Iterable[pa.RecordBatch]:
        """Routing rows shard by shard, row group by row group (bounded memory), as Arrow batches."""
        cols = list(columns) if columns is not None else None
        for path in self.shard_paths("routing"):
            pf = self.parquet_file(path)
            for i in range(pf.num_row_groups):
                yield from pf.read_row_group(i, columns=cols).to_batches()

    def requests(self) -> pl.DataFrame:
        paths = self.shard_paths("requests")
        if not paths:
            return pl.from_arrow(REQUESTS_SCHEMA.empty_table())
        return self._unlabelled(self._frame(paths[0]))

    def loads(self) -> pl.LazyFrame | None:
        """Count tables (sources without per-token rows), or ``None`` if the trace has none."""
        paths = self.shard_paths("loads")
        if not paths:
            return None
        if self.check_reads:
            return self._unlabelled(pl.concat([self._frame(p) for p in paths]).lazy())
        return self._unlabelled(pl.scan_parquet([str(p) for p in paths]))

    def _unlabelled(self, frame):
        """Old imports wrote "unknown" for a request without a domain; say "unlabelled" as capture does."""
        if self.manifest.source not in IMPORTED_SOURCES:
            return frame
        domain = pl.col("domain")
        return frame.with_columns(
            pl.when(domain == LEGACY_UNLABELLED).then(pl.lit(UNLABELLED)).otherwise(domain).alias("domain")
        )


class ShardReader:
    """Row groups of verified shards for a pool of threads: each shard's bytes are read and hashed
    once (by the first thread that needs it) and dropped after its last row group is read.

    A pyarrow ``ParquetFile`` must not be read by two threads at once: its read-ahead cache then
    hands one thread's row group the other's byte ranges ("ReadRangeCache did not find matching cache
    entry", which reads as a corrupt shard), corrupts memory or deadlocks. Each read takes a reader of its own over the shard's
    verified bytes (parsing the footer again costs far less than reading the row group), and gives
    it back for the next one."""

    def __init__(self, trace: Trace, units: Iterable[tuple[Path, int]]) -> None:
        self.trace = trace
        self._left: dict[Path, int] = {}
        for path, _ in units:
            self._left[path] = self._left.get(path, 0) + 1
        self._open: dict[Path, tuple[Callable[[], pq.ParquetFile], list[pq.ParquetFile]]] = {}
        self._locks = {p: threading.Lock() for p in self._left}
        self._lock = threading.Lock()

    def _opener(self, path: Path) -> tuple[Callable[[], pq.ParquetFile], pq.ParquetFile]:
        """A function that makes another reader of shard ``path``, and a first reader (verified)."""
        if not self.trace.check_reads:
            return (lambda: fs.parquet_file(path)), fs.parquet_file(path)
        data = self.trace.shard_bytes(path)  # size and sha256 checked
        first = self.trace._parse_shard(path, data)
        meta = first.metadata
        return (lambda: pq.ParquetFile(pa.BufferReader(data), metadata=meta)), first

    def read_row_group(self, path: Path, i: int, columns: list[str] | None) -> pa.Table:
        pf, idle = self._take(path)
        try:
            return pf.read_row_group(i, columns=columns, use_threads=False)
        finally:
            self._give(path, pf, idle)

    def iter_row_group(self, path: Path, i: int, columns: list[str] | None, rows: int) -> Iterator[pa.Table]:
        """Row group ``i`` of shard ``path`` as tables of at most ``rows`` rows, each decoded when it is
        asked for. The buffers of one are freed before the next is decoded and are reused for it, where
        a whole row group (0.1 GB at 10^6 rows) takes fresh memory whose page faults cost several times
        the decoding itself."""
        pf, idle = self._take(path)
        try:
            for batch in pf.iter_batches(batch_size=rows, row_groups=[i], columns=columns, use_threads=False):
                yield pa.Table.from_batches([batch])
        finally:
            self._give(path, pf, idle)

    def _take(self, path: Path) -> tuple[pq.ParquetFile, list[pq.ParquetFile]]:
        """A reader of shard ``path`` for this thread alone, and the list of idle readers to give it back to."""
        with self._locks[path]:
            entry = self._open.get(path)
            if entry is None:
                opener, first = self._opener(path)
                entry = self._open[path] = (opener, [first])
            opener, idle = entry
            pf = idle.pop() if idle else None
        return (pf if pf is not None else opener()), idle

    def _give(self, path: Path, pf: pq.ParquetFile, idle: list[pq.ParquetFile]) -> None:
        """Give a reader back after one row group; drop the shard's bytes after its last row group."""
        with self._locks[path]:
            idle.append(pf)
        with self._lock:
            self._left[path] -= 1
            if self._left[path] == 0:
                self._open.pop(path, None)
