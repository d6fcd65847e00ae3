"""Write a trace directory: shards in the background, manifest last, nothing ever half-written.

Producers (capture hooks, importers, generators) hand column chunks to :class:`TraceWriter`; a
background thread turns them into Parquet shards of at most ``shard_rows`` rows. Each shard is
written under a temporary name, fsynced and renamed, and the manifest is rewritten (atomically,
``complete: false``) after every shard, so a process that dies at any point leaves a valid trace
holding every shard it finished. :meth:`TraceWriter.close` writes the last shard and marks the
manifest ``complete: true``.

Memory is bounded: at most ``max_pending`` chunks wait in the queue (a producer that outruns the
disk blocks), and at most ``shard_rows`` rows are held before they are spilled to a shard.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moeprof.errors import TraceError
from moeprof.trace.manifest import Manifest, ModelInfo, Shard, write_json_atomic
from moeprof.trace.schema import (
    ENGINE_REQUEST_ID_FIELD,
    LOADS_DIR,
    LOADS_SCHEMA,
    MANIFEST_FILE,
    PHASES,
    REQUESTS_FILE,
    REQUESTS_SCHEMA,
    ROUTING_DIR,
    routing_schema,
)

_PHASE_DICT = pa.array(list(PHASES), pa.string())


@dataclass
class RequestInfo:
    request_id: int
    domain: str
    dataset: str | None = None
    prompt_tokens: int = 0
    decode_tokens: int = 0
    text_sha256: str | None = None
    engine_request_id: str | None = None
    """The serving engine's own request id (vLLM's are strings), kept beside the int64 ``request_id``."""


def phase_array(phase: Any, n: int) -> pa.DictionaryArray:
    """Phase column from codes (0 = prefill, 1 = decode), strings, or one value for all ``n`` rows."""
    if isinstance(phase, str):
        codes = np.full(n, PHASES.index(_check_phase(phase)), dtype=np.int8)
    else:
        arr = np.asarray(phase)
        if arr.dtype.kind in "US" or arr.dtype == object:
            lookup = {p: i for i, p in enumerate(PHASES)}
            try:
                codes = np.fromiter((lookup[str(p)] for p in arr), dtype=np.int8, count=len(arr))
            except KeyError as exc:
                raise TraceError(f"unknown phase {exc.args[0]!r}; expected one of {PHASES}") from None
        else:
            codes = arr.astype(np.int8, copy=False)
            if codes.size and (codes.min() < 0 or codes.max() >= len(PHASES)):
                raise TraceError(f"phase codes must be 0 (prefill) or 1 (decode), got {np.unique(codes)}")
    return pa.DictionaryArray.from_arrays(numpy_array(codes, pa.int8()), _PHASE_DICT)


def _check_phase(p: str) -> str:
    if p not in PHASES:
        raise TraceError(f"unknown phase {p!r}; expected one of {PHASES}")
    return p


def routing_table(
    top_k: int,
    *,
    request_id: Any,
    step: Any,
    phase: Any,
    pos: Any,
    layer: Any,
    experts: Any,
    weights: Any = None,
    batch_id: Any = None,
    token_id: Any = None,
) -> pa.Table:
    """Build one routing chunk with the exact Arrow types of format v1.

    Shapes: ``experts`` and ``weights`` are ``(n, top_k)``; every other argument is ``(n,)`` or a
    scalar broadcast to ``n`` rows. ``phase`` is codes (0 prefill, 1 decode), strings, or one string.
    ``weights``, ``batch_id`` and ``token_id`` may be ``None`` (null column).
    """
    experts = np.asarray(experts)
    if experts.ndim != 2 or experts.shape[1] != top_k:
        raise TraceError(f"experts must have shape (n, {top_k}), got {experts.shape}")
    n = experts.shape[0]

    def col(x: Any, dtype: Any) -> np.ndarray:
        a = np.asarray(x)
        if a.ndim == 0:
            return np.full(n, a, dtype=dtype)
        if a.shape != (n,):
            raise TraceError(f"column of shape {a.shape} does not match {n} rows")
        return a.astype(dtype, copy=False)

    def nullable(x: Any, dtype: Any, pa_type: pa.DataType) -> pa.Array:
        if x is None:
            return pa.nulls(n, pa_type)
        return numpy_array(col(x, dtype), pa_type)

    # Lists built with the schema's own types (items not null): Table.from_arrays would otherwise cast them,
    # and a cast imports pyarrow.compute (about 30 ms of every capture's and import's start)
    schema = routing_schema(top_k)
    flat_e = numpy_array(np.ascontiguousarray(experts, dtype=np.int16).reshape(-1), pa.int16())
    if weights is None:
        weights_arr: pa.Array = pa.nulls(n, schema.field("weights").type)
    else:
        w = np.asarray(weights, dtype=np.float32)
        if w.shape != (n, top_k):
            raise TraceError(f"weights must have shape ({n}, {top_k}), got {w.shape}")
        weights_arr = pa.FixedSizeListArray.from_arrays(numpy_array(w.reshape(-1), pa.float32()),
                                                         type=schema.field("weights").type)
    return pa.Table.from_arrays(
        [
            numpy_array(col(request_id, np.int64), pa.int64()),
            numpy_array(col(step, np.int32), pa.int32()),
            phase_array(phase, n),
            numpy_array(col(pos, np.int32), pa.int32()),
            numpy_array(col(layer, np.int16), pa.int16()),
            pa.FixedSizeListArray.from_arrays(flat_e, type=schema.field("experts").type),
            weights_arr,
            nullable(batch_id, np.int64, pa.int64()),
            nullable(token_id, np.int32, pa.int32()),
        ],
        schema=schema,
    )


def numpy_array(values: np.ndarray, pa_type: pa.DataType) -> pa.Array:
    """A 1-D numpy array of ``pa_type``'s own dtype as an Arrow array without nulls, sharing its memory.

    ``pa.array(ndarray)`` asks whether the array is a masked array, which imports ``numpy.ma`` (about
    20 ms once per process with numpy 2.4: a fifth of importing 10,000 rows).
    """
    values = np.ascontiguousarray(values)
    if values.dtype != pa_type.to_pandas_dtype() or values.ndim != 1:
        raise TraceError(f"internal: a {values.dtype} array of shape {values.shape} is not a column of {pa_type}")
    return pa.Array.from_buffers(pa_type, len(values), [None, pa.py_buffer(values)])


def prepare_output_dir(out: Path, force: bool, *, lock: bool = False) -> None:
    """Make ``out`` an empty directory marked as a trace, replacing an earlier moeprof output only with
    ``force`` and only if every file in it is moeprof's (see :mod:`moeprof.outputs`); with ``lock``,
    refused while another process writes it, and held by this one (a :class:`TraceWriter` until it closes)."""
    from moeprof.outputs import begin_in_place

    begin_in_place(out, "trace", force, lock=lock)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_parquet_atomic(table: pa.Table, path: Path) -> Shard:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return Shard(path="", kind="", rows=table.num_rows, bytes=path.stat().st_size, sha256=sha256_file(path))


def request_cut(request_id: np.ndarray, limit: int) -> int:
    """Rows to put in a shard of at most ``limit`` rows so the request at the cut is not split: the
    start of the run of that request's rows (``limit`` when a single request fills the shard)."""
    if limit >= request_id.size or request_id[limit - 1] != request_id[limit]:
        return limit
    other = np.flatnonzero(request_id[:limit] != request_id[limit])
    return int(other[-1]) + 1 if other.size else limit


def request_range(table: pa.Table) -> list[int] | None:
    """``[first, last]`` request id of a routing table (None when it has no rows)."""
    if table.num_rows == 0:
        return None
    # numpy over each chunk (non-null int64): pyarrow.compute would cost its import, about 30 ms, to every
    # capture and import that writes a trace
    chunks = [c.to_numpy() for c in table.column("request_id").chunks if len(c)]
    return [int(min(c.min() for c in chunks)), int(max(c.max() for c in chunks))]


_STOP = object()
_FLUSH = object()


class TraceWriter:
    """Write a trace directory; use as a context manager or call :meth:`close`.

    ``with TraceWriter(out, model=..., source="hf") as w: w.write_routing(table)`` writes a complete
    trace; an exception inside the block leaves a valid trace marked ``complete: false``.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        model: ModelInfo,
        source: str,
        capture: Mapping[str, Any] | None = None,
        missing: Mapping[str, str] | None = None,
        notes: list[str] | None = None,
        force: bool = False,
        shard_rows: int = 1 << 20,
        max_pending: int = 16,
        staged: bool = False,
        request_shards: bool = False,
    ) -> None:
        # staged: write into a hidden sibling that becomes ``out`` only when the trace closes complete
        # (an import: whole or nothing); otherwise write in place (a capture: a killed run keeps its steps).
        self.target = Path(out)
        self._staged = staged
        if staged:
            from moeprof.outputs import begin_staged

            self.out = begin_staged(self.target, "trace", force)
        else:
            prepare_output_dir(self.target, force, lock=True)
            self.out = self.target
        self.manifest = Manifest(
            source=source,
            model=model,
            capture=dict(capture or {}),
            missing=dict(missing or {}),
            notes=list(notes or []),
        )
        self._schema = routing_schema(model.top_k)
        self._shard_rows = max(1, int(shard_rows))
        # Cut shards between requests, so a producer that writes request after request gets each
        # request's rows in one shard (per-request aggregates then stay local to one shard's task).
        self._request_shards = bool(request_shards)
        self._requests: dict[int, RequestInfo] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._n_routing = 0
        self._n_loads = 0
        self._error: BaseException | None = None
        self._closed = False
        self.rows_written = 0
        self._thread = threading.Thread(target=self._run, name="moeprof-trace-writer", daemon=True)
        self._thread.start()
        try:
            self._write_manifest()
        except OSError as exc:  # disk full, file size limit: nothing of a staged trace is left
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
            self._finish_staged(False)
            raise TraceError(f"writing {self.target} failed: {exc.strerror or exc}") from exc

    # -- producer side ---------------------------------------------------------------------------
    def write_routing(self, chunk: pa.Table | Mapping[str, Any]) -> None:
        """Queue routing rows: a table of :func:`routing_schema` or the keyword columns of :func:`routing_table`."""
        self._raise_if_failed()
        if not isinstance(chunk, pa.Table):
            chunk = routing_table(self.manifest.model.top_k, **chunk)
        elif not chunk.schema.equals(self._schema):
            chunk = chunk.select(self._schema.names).cast(self._schema)
        if chunk.num_rows:
            self._queue.put(chunk)

    def write_loads(self, table: pa.Table) -> None:
        """Write a loads shard (counts per window/phase/layer/expert) now, in the caller's thread."""
        self._raise_if_failed()
        table = table.select(LOADS_SCHEMA.names).cast(LOADS_SCHEMA)
        name = f"{LOADS_DIR}/part-{self._n_loads:05d}.parquet"
        shard = _write_parquet_atomic(table, self.out / name)
        shard.path, shard.kind = name, "loads"
        self._n_loads += 1
        with self._lock:
            self.manifest.shards.append(shard)
        self._write_manifest()

    def set_request(self, request_id: int, domain: str, **fields: Any) -> None:
        """Record or update a request (``dataset``, ``prompt_tokens``, ``decode_tokens``, ``text_sha256``,
        ``engine_request_id``)."""
        with self._lock:
            info = self._requests.get(int(request_id))
            if info is None:
                info = RequestInfo(int(request_id), str(domain))
                self._requests[info.request_id] = info
            else:
                info.domain = str(domain)
            for key, value in fields.items():
                if not hasattr(info, key):
                    raise TypeError(f"unknown request field {key!r}")
                setattr(info, key, value)

    def add_decode_tokens(self, request_id: int, n: int = 1) -> None:
        with self._lock:
            self._requests[int(request_id)].decode_tokens += n

    def has_request(self, request_id: int) -> bool:
        with self._lock:
            return int(request_id) in self._requests

    def flush(self, wait: bool = True) -> None:
        """Write every queued row into a shard now and update the manifest (still incomplete).

        ``wait=False`` only asks the writer's thread to do it after the rows already queued.
        """
        self._raise_if_failed()
        done = threading.Event()
        self._queue.put((_FLUSH, done))
        if wait:
            done.wait()
            self._raise_if_failed()

    def close(self, complete: bool = True) -> Manifest:
        """Write the remaining rows and the final manifest. Idempotent."""
        if self._closed:
            return self.manifest
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        if self._error is not None:
            complete = False
        self.manifest.complete = complete
        ok = False
        try:
            self._write_manifest()
            ok = complete and self._error is None
        finally:
            self._finish_staged(ok)
        if self._error is not None:
            raise TraceError(f"writing {self.target} failed: {self._error}") from self._error
        return self.manifest

    def _finish_staged(self, ok: bool) -> None:
        """A staged trace: move it to its target when complete, else remove every file of it."""
        if not self._staged:
            from moeprof.outputs import release_output

            release_output(self.out)  # written in place: another process may replace it now
            return
        from moeprof.outputs import commit_staged, discard_staged

        if ok:
            commit_staged(self.out, self.target)
            self.out = self.target
        else:
            discard_staged(self.out)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)

    # -- background thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    if self._error is None:
                        self._spill()
                    return
                if isinstance(item, tuple) and item[0] is _FLUSH:
                    try:
                        if self._error is None:
                            self._spill()
                    finally:
                        item[1].set()
                    continue
                if self._error is not None:
                    continue  # drain the queue so producers never block on a dead writer
                self._pending.append(item)
                self._pending_rows += item.num_rows
                while self._pending_rows >= self._shard_rows:
                    self._spill(limit=self._shard_rows)
            except BaseException as exc:  # noqa: BLE001 - surfaced to the producer
                self._error = exc
                if item is _STOP:
                    return  # the last spill failed (disk full): close() must not wait for another item

    def _spill(self, limit: int | None = None) -> None:
        if not self._pending_rows:
            self._write_manifest()
            return
        table = pa.concat_tables(self._pending)
        if limit is not None and table.num_rows > limit:
            if self._request_shards:
                limit = request_cut(table.column("request_id").to_numpy(), limit)
            rest = table.slice(limit)
            table = table.slice(0, limit)
            self._pending, self._pending_rows = [rest], rest.num_rows
        else:
            self._pending, self._pending_rows = [], 0
        name = f"{ROUTING_DIR}/part-{self._n_routing:05d}.parquet"
        shard = _write_parquet_atomic(table.combine_chunks(), self.out / name)
        shard.path, shard.kind = name, "routing"
        shard.request_ids = request_range(table)
        self._n_routing += 1
        self.rows_written += shard.rows
        with self._lock:
            self.manifest.shards.append(shard)
        self._write_manifest()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise TraceError(f"writing {self.target} failed: {self._error}") from self._error

    def _write_manifest(self) -> None:
        with self._lock:
            requests = sorted(self._requests.values(), key=lambda r: r.request_id)
            table = pa.Table.from_pylist(
                [
                    {
                        "request_id": r.request_id,
                        "domain": r.domain,
                        "dataset": r.dataset,
                        "prompt_tokens": int(r.prompt_tokens),
                        "decode_tokens": int(r.decode_tokens),
                        "text_sha256": r.text_sha256,
                    }
                    for r in requests
                ],
                schema=REQUESTS_SCHEMA,
            )
            if any(r.engine_request_id is not None for r in requests):
                # Optional column (format 1.x readers select the columns they know and ignore it).
                table = table.append_column(
                    ENGINE_REQUEST_ID_FIELD, pa.array([r.engine_request_id for r in requests], pa.string())
                )
            shard = _write_parquet_atomic(table, self.out / REQUESTS_FILE)
            shard.path, shard.kind = REQUESTS_FILE, "requests"
            self.manifest.shards = [s for s in self.manifest.shards if s.kind != "requests"] + [shard]
            write_json_atomic(self.out / MANIFEST_FILE, self.manifest.to_dict())
