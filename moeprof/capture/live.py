"""Live recording inside a serving engine: forward passes in, a rank's trace out, off the engine thread.

An engine adapter (the vLLM plugin) hands :class:`LiveRecorder` one :class:`PassRecord` per forward
pass: the requests in the pass (engine request ids, tokens scheduled, tokens computed before,
prompt lengths) and host copies (or copies still in flight) of the expert ids and token ids.
:meth:`LiveRecorder.push` only queues it; a background thread waits for the copy, turns the pass
into rows (:mod:`moeprof.capture.rows`), writes them through a
:class:`~moeprof.trace.writer.TraceWriter` into ``<root>/ranks/<rank>/``, and every
``flush_seconds`` flushes a shard and merges the top-level manifest (:mod:`moeprof.capture.shards`),
so a server that is killed keeps every pass flushed before it died.

Trace request ids are ``rank_offset * 2**32 + n`` (n = order of first appearance on that rank), so
ranks that serve different requests never collide and pipeline stages, which see the same requests
in the same order, agree. Batch ids are ``rank_offset * 2**40 + pass number`` the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moeprof.capture.rows import PositionLedger, StepLayout, routing_columns, token_columns
from moeprof.capture.shards import RANKS_DIR, merge_ranks
from moeprof.capture.tags import parse_tag
from moeprof.trace.manifest import ModelInfo
from moeprof.trace.writer import TraceWriter

logger = logging.getLogger("moeprof.live")

DEFAULT_DOMAIN = "unlabelled"
REQUEST_STRIDE = 1 << 32
BATCH_STRIDE = 1 << 40

COUNTING_RULE = (
    "rows per request per MoE layer = prompt tokens the engine computed (prefill, every chunk) + "
    "generated tokens fed back to the model (one decode step each); the last generated token is never "
    "fed back; a position recomputed after preemption is recorded once"
)


@dataclass
class PassRecord:
    """One forward pass of one rank. Arrays ``(r,)`` per request, in the pass's token order."""

    engine_ids: list[str]
    num_tokens: np.ndarray
    start_pos: np.ndarray
    prompt_len: np.ndarray
    experts: Any
    """``(n, L, k)`` integer expert ids (numpy or a CPU torch tensor), layers in ``LiveRecorder.layers`` order."""
    token_ids: Any = None
    """``(n,)`` input token ids, or ``None``."""
    ready: Callable[[], None] | None = None
    """Blocks until ``experts``/``token_ids`` hold their data (an asynchronous device-to-host copy)."""


@dataclass
class _Request:
    trace_id: int
    engine_id: str
    domain: str
    dataset: str | None
    prompt_len: int
    decode: int = 0


_STOP = object()


@dataclass
class LiveRecorder:
    """Record one rank's passes into ``root/ranks/<rank>/`` and keep ``root/manifest.json`` merged."""

    root: Path
    rank: str
    model: ModelInfo
    layers: list[int]
    source: str
    capture: dict[str, Any] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rank_offset: int = 0
    flush_seconds: float = 5.0
    max_pending: int = 64

    def __post_init__(self) -> None:
        from moeprof.outputs import read_marker, write_marker

        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if read_marker(self.root) is None:  # the plugin marks it first; a library caller may not have
            write_marker(self.root, "trace")
        self.writer = TraceWriter(
            self.root / RANKS_DIR / self.rank,
            model=self.model,
            source=self.source,
            capture=self.capture,
            missing=self.missing,
            notes=[COUNTING_RULE, *self.notes],
        )
        self._layers = np.asarray(self.layers, dtype=np.int16)
        self._requests: dict[str, _Request] = {}
        self._ledger = PositionLedger()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, self.max_pending))
        self._passes = 0
        self.rows = 0
        self.error: BaseException | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        try:
            merge_ranks(self.root)
        except BaseException:
            self.writer.close(complete=False)
            raise
        self._thread = threading.Thread(target=self._run, name=f"moeprof-live-{self.rank}", daemon=True)
        self._thread.start()

    # -- engine thread ---------------------------------------------------------------------------
    def push(self, record: PassRecord) -> None:
        """Queue one pass (blocks only while ``max_pending`` passes wait: the disk is behind)."""
        if self._closed or self.error is not None:
            return
        self._queue.put(record)

    def close(self, complete: bool = True) -> None:
        """Write every queued pass, mark this rank complete, merge. Idempotent, any thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
            if self._ledger.recomputed:
                self.writer.manifest.notes.append(
                    f"{self._ledger.recomputed} token positions were computed again after preemption "
                    "and recorded once"
                )
            self.writer.close(complete=complete and self.error is None)
            merge_ranks(self.root)

    # -- background thread -----------------------------------------------------------------------
    def _run(self) -> None:
        last_flush, dirty = time.monotonic(), False
        while True:
            try:
                item = self._queue.get(timeout=self.flush_seconds)
            except queue.Empty:
                item = None
            # Take every pass already waiting: one writer call for all of them amortises the Arrow
            # conversion, and the thread holds the GIL in fewer, longer turns.
            batch, stop = [], False
            while item is not None:
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            if self.error is None:
                try:
                    if batch:
                        self._write(batch)
                        dirty = True
                    if dirty and (stop or time.monotonic() - last_flush >= self.flush_seconds):
                        self.writer.flush()
                        merge_ranks(self.root)
                        last_flush, dirty = time.monotonic(), False
                except BaseException as exc:  # noqa: BLE001 - recording must not take the server down
                    self.error = exc
                    logger.error("moeprof: recording into %s stopped: %s", self.writer.out, exc)
            if stop:
                return

    def _request(self, engine_id: str, prompt_len: int) -> _Request:
        req = self._requests.get(engine_id)
        if req is None:
            tag = parse_tag(engine_id)
            req = _Request(
                trace_id=self.rank_offset * REQUEST_STRIDE + len(self._requests),
                engine_id=engine_id,
                domain=tag.domain if tag else DEFAULT_DOMAIN,
                dataset=tag.dataset if tag else None,
                prompt_len=int(prompt_len),
            )
            self._requests[engine_id] = req
            self.writer.set_request(
                req.trace_id,
                req.domain,
                dataset=req.dataset,
                prompt_tokens=req.prompt_len,
                engine_request_id=engine_id,
            )
        return req

    def _write(self, records: list[PassRecord]) -> None:
        chunks = [c for c in (self._rows(rec) for rec in records) if c is not None]
        if not chunks:
            return
        merged = {
            key: None if chunks[0][key] is None else np.concatenate([c[key] for c in chunks])
            for key in chunks[0]
        }
        self.writer.write_routing(merged)
        self.rows += int(merged["experts"].shape[0])

    def _rows(self, rec: PassRecord) -> dict[str, Any] | None:
        """One pass's routing columns (``None`` if it has no fresh token); updates the requests."""
        if rec.ready is not None:
            rec.ready()
        experts = np.asarray(rec.experts)
        reqs = [self._request(e, p) for e, p in zip(rec.engine_ids, rec.prompt_len.tolist())]
        layout = StepLayout.of([r.trace_id for r in reqs], rec.num_tokens, rec.start_pos, rec.prompt_len)
        keep = self._ledger.fresh(layout)
        batch_id = self.rank_offset * BATCH_STRIDE + self._passes
        self._passes += 1
        decoded = token_columns(layout)["phase"].astype(bool) & keep
        per_request = np.bincount(layout.token_index()[decoded], minlength=layout.num_requests)
        for req, n in zip(reqs, per_request.tolist()):
            if n:
                req.decode += n
                self.writer.set_request(req.trace_id, req.domain, decode_tokens=req.decode)
        if not keep.any():
            return None
        return routing_columns(
            layout,
            np.ascontiguousarray(experts.transpose(1, 0, 2)),
            self._layers,
            batch_id=batch_id,
            token_ids=None if rec.token_ids is None else np.asarray(rec.token_ids),
            keep=keep,
        )
