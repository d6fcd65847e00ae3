"""Moving recorded steps from the device to the host side of a capture, at few tensor calls per step.

At small batches an eager decode step on a GPU is bound by the thread that launches kernels: every
tensor call capture makes there (about 14 µs each on an H200 host, ``bench/capture_pack_variants.py``)
is paid by the step. So:

- **Groups of one dtype.** A step's parts are gathered into one device byte buffer with one
  ``torch.stack`` per group: the ids of every layer, the weights of every layer, and the step's
  tokens, positions and validity as int64 rows. A promoting ``torch.cat`` over mixed dtypes, as
  before, falls back to one copy per input on CUDA.
- **Deferred decode steps.** In eager decoding every forward allocates its routing outputs afresh,
  so holding a reference keeps them intact: one-token decode steps of a running batch keep only
  references (and one stack of their small inputs, which a caller's loop may overwrite in place),
  and are gathered ``block`` at a time, with one copy to the host per block. Outputs of CUDA-graph
  replays are static buffers overwritten by the next replay, so steps are deferred only once two
  decode steps in a row were seen to return routing outputs at different addresses, never with a
  static (compileable) KV cache, and never with the routing of a step at the address of one held.
- **Copied decode steps.** A decode step that cannot be held (a static cache, CUDA graphs) is
  written as it ends into its slot of a block buffer, and the block goes to the host with one copy
  once ``block`` steps are in. Where the ids are int64 (most routers' ``topk``), one ``torch.cat``
  writes a step's ids and its tokens, positions and validity, token-major (the one-token step's
  ``(b, 1)`` inputs are columns already), and one stack its weights: two tensor calls a step.
- **Longer blocks for small steps.** Processing a block on the host costs about as much at 32
  steps as at 128 while steps are small, so decode steps of a few KiB (batch 1-8) are gathered up
  to ``max_block`` at a time, a block's routing staying under ``block_bytes`` and its first step
  no older than ``block_seconds``.
- **One copy, one event.** Each gathered unit makes one asynchronous copy into pooled pinned host
  memory; one CUDA event per block says every copy before it has landed.

The host side decodes a unit into per-step numpy views and hands them, in order, to ``process``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np
import torch

from moeprof.errors import CaptureError

# (meta, ids (L, n, k) int16, weights (L, n, k) float32 | None, tokens (n,) int32, positions (n,) int32 | None,
#  valid (b, s) bool)
Step = tuple[Any, np.ndarray, "np.ndarray | None", np.ndarray, "np.ndarray | None", np.ndarray]


@dataclass(frozen=True)
class Layout:
    """Where the parts of ``steps`` gathered steps lie in a unit's bytes (each part 8-byte aligned)."""

    steps: int
    layers: int
    n: int
    k: int
    ids_dtype: torch.dtype
    w_dtype: torch.dtype | None
    rows: int  # int64 rows of n per step: tokens, [positions], valid
    fused: bool = False
    """int64 ids and the small rows of a step share one ``(n, layers * k + rows)`` part, token-major:
    one ``torch.cat`` writes both (one-token steps, whose small rows are ``(n, 1)`` already)."""

    @cached_property
    def sizes(self) -> list[int]:
        per = self.steps * self.layers * self.n * self.k
        w = per * self.w_dtype.itemsize if self.w_dtype is not None else 0
        if self.fused:
            return [self.steps * self.n * (self.layers * self.k + self.rows) * 8, w, 0]
        return [per * self.ids_dtype.itemsize, w, self.steps * self.rows * self.n * 8]

    @cached_property
    def offsets(self) -> list[int]:
        out = [0]
        for size in self.sizes:
            out.append(out[-1] + -(-size // 8) * 8)
        return out

    @cached_property
    def nbytes(self) -> int:
        return self.offsets[-1]


_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.uint8: np.uint8,
          torch.int8: np.int8, torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


def decode(layout: Layout, raw: np.ndarray, metas: list) -> list[Step]:
    """Per-step views of one unit's bytes (``raw``: uint8, ``layout.nbytes`` long)."""
    T, L, n, k = layout.steps, layout.layers, layout.n, layout.k
    o, sizes = layout.offsets, layout.sizes
    if layout.fused:  # (T, n, L*k + rows) int64, token-major
        both = raw[o[0] : o[0] + sizes[0]].view(np.int64).reshape(T, n, L * k + layout.rows)
        ids = both[:, :, : L * k].reshape(T, n, L, k).transpose(0, 2, 1, 3).astype(np.int16)
        small = both[:, :, L * k :].transpose(0, 2, 1)
    else:
        ids = raw[o[0] : o[0] + sizes[0]].view(_NUMPY[layout.ids_dtype]).astype(np.int16).reshape(T, L, n, k)
        small = raw[o[2] : o[2] + sizes[2]].view(np.int64).reshape(T, layout.rows, n)
    weights = None
    if layout.w_dtype is not None:
        w = raw[o[1] : o[1] + sizes[1]]
        if layout.w_dtype == torch.bfloat16:  # the high half of a float32: exact
            w = (w.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            w = w.view(_NUMPY[layout.w_dtype]).astype(np.float32, copy=False)
        weights = w.reshape(T, L, n, k)
    tokens = small[:, 0].astype(np.int32)
    valid = small[:, -1] != 0
    positions = small[:, 1].astype(np.int32) if layout.rows == 3 else None
    return [
        (meta, ids[t], None if weights is None else weights[t], tokens[t],
         None if positions is None else positions[t], valid[t].reshape(meta.b, meta.s))
        for t, meta in enumerate(metas)
    ]


@dataclass
class _Unit:
    metas: list
    layout: Layout
    host: torch.Tensor  # uint8: pinned (CUDA) or the gathered buffer itself (CPU)
    event: Any = None
    cuda: bool = False  # copied from a CUDA buffer: in flight until ``event`` (or a later one) completes


class HostPipe:
    """Gathers steps on the device, copies them to the host and hands them, in order, to ``process``.

    ``submit(meta, ids, weights, small, deferrable)`` takes one step: the per-layer ids and weights
    as the routing hooks left them, and ``small``, the step's tokens, positions (or not) and
    validity as int64 tensors of one shape of ``n`` elements (the model's ``(b, s)``: they are
    stacked into views of that shape, so no reshape is paid per step). Finished steps are processed ``block`` at a time, always
    leaving the newest unit pending, so its copy has long landed when it is read.

    Small blocks are processed in the forward's thread: a worker thread would contend for the GIL
    with the thread that launches kernels. A block of at least ``big_bytes`` (a prefill of more than
    about 50,000 token-layers) goes to one worker thread instead, mostly in numpy calls that release
    the GIL (at 16 MiB, a Qwen3-shaped batch 8 x 2048 prefill, 15.7 MB, kept 615-659 µs per decode
    step on the launching thread of compiled decoding; at 4 MiB 157-201 µs, H200);
    the next block waits for it, so steps are still processed in order, and an error raised there
    surfaces at the next hand-over or at ``drain``.
    """

    def __init__(self, process: Callable[[list[Step]], None], block: int = 32, big_bytes: int = 4 << 20,
                 defer: bool = True, max_block: int | None = None, block_bytes: int = 1 << 20,
                 block_seconds: float = 1.0) -> None:
        self._process = process
        self._block = max(1, int(block))
        self._max_block = max(self._block, int(max_block if max_block is not None else self._block))
        self._block_bytes = int(block_bytes)
        self._block_seconds = float(block_seconds)
        self._group_t0 = 0.0
        self._group_block = self._block
        self._fuse = True  # one cat for a copied decode step's int64 ids and small rows (off: three stacks)
        self._big_bytes = big_bytes
        self._defer = defer
        self._pending: list[_Unit] = []
        self._pending_steps = 0
        # Decode steps gathered a block at a time: "held" (references: (meta, ids, weights, small))
        # or "copied" (metas; their routing already stacked into the slots of a block buffer)
        self._group: list = []
        self._group_kind: str | None = None
        self._group_key: tuple | None = None
        self._slots: tuple | None = None  # (layout, buffer, per-step slot views) of the copied group
        self._group_ptrs: set[int] = set()
        self._eager = False  # two decode steps in a row returned routing at different addresses
        self._last_ids: torch.Tensor | None = None  # the last decode step's first ids, held for the check
        self._buffers: dict[tuple, tuple] = {}
        self._worker: Any = None
        self._job: Any = None

    # -- the forward's thread ---------------------------------------------------------------------------
    def submit(self, meta: Any, ids: list, weights: list | None, small: list, deferrable: bool,
               decode: bool | None = None) -> None:
        """``decode``: a one-token decode step of the running batch, on one device (default:
        ``deferrable``); its routing can go into a block. ``deferrable``: and it may be held by
        reference (eager decoding)."""
        decode = deferrable if decode is None else decode
        if torch.is_grad_enabled():  # a forward run with autograd on: the copies are part of no graph
            with torch.no_grad():
                return self._submit(meta, ids, weights, small, deferrable, decode)
        return self._submit(meta, ids, weights, small, deferrable, decode)

    def _submit(self, meta: Any, ids: list, weights: list | None, small: list, deferrable: bool, decode: bool) -> None:
        if deferrable and self._defer and self._deferrable(meta, ids[0]):
            key = (meta.b, meta.s, len(small))
            if self._group and (key != self._group_key or self._group_kind != "held"):
                self._flush_group()
            if not self._group:
                self._group_kind, self._group_key = "held", key
                self._start_group(ids, weights)
            self._group.append((meta, list(ids), None if weights is None else list(weights), torch.stack(small)))
            if self._group_full():
                self._flush_group()
            return
        if not deferrable:
            self._eager, self._last_ids = False, None
        if decode and self._defer:
            self._copy_into_block(meta, ids, weights, small)
            return
        self._flush_group()
        self._add(self._gather([meta], ids, weights, small, stacked=False))

    def _copy_into_block(self, meta: Any, ids: list, weights: list | None, small: list) -> None:
        """A decode step whose outputs may be overwritten (CUDA-graph replays, a static cache): its
        routing is stacked now into the next slot of a block buffer, copied to the host once the
        block is full. Two tensor calls per step (ids and small rows in one ``torch.cat`` where the
        ids are int64 and the step is one token per row; else three stacks); one copy, one event per
        block."""
        first = ids[0]
        key = (tuple(small[0].shape), len(small), len(ids), first.shape, _common(ids),
               None if weights is None else _common(weights), first.device)
        if self._group and (key != self._group_key or self._group_kind != "copied"):
            self._flush_group()
        if not self._group:
            self._group_kind, self._group_key = "copied", key
            self._start_group(ids, weights)
            self._slots = self._block_slots(key, self._group_block)
        s_ids, s_w, s_small = self._slots[2][len(self._group)]
        if s_small is None:  # fused: (n, L*k + rows)
            torch.cat(ids + small, dim=1, out=s_ids)
        else:
            torch.stack(ids, out=s_ids)
            torch.stack(small, out=s_small)
        if weights is not None:
            torch.stack(weights, out=s_w)
        self._group.append(meta)
        if self._group_full():
            self._flush_group()

    def _start_group(self, ids: list, weights: list | None) -> None:
        self._group_block = self._block_for(ids, weights)
        self._group_t0 = time.monotonic()

    def _group_full(self) -> bool:
        """A block is cut at ``_group_block`` steps, or once its first step is ``block_seconds`` old:
        slow steps (eager batch 1 on a GPU: 15-20 ms) would otherwise hold 128 steps, 2-3 s, back
        from the writer, and a killed capture would lose them."""
        return len(self._group) >= self._group_block or time.monotonic() - self._group_t0 >= self._block_seconds

    def _block_for(self, ids: list, weights: list | None) -> int:
        """Decode steps per block for steps like this one: ``block``, or more for small steps.

        Processing a block on the host costs about the same at 32 steps as at 128 when a step is a
        few KiB (batch 1-8), so small steps are gathered up to ``max_block`` at a time, as long as a
        block's routing stays under ``block_bytes``."""
        first = ids[0]
        step = len(ids) * first.numel() * (first.element_size() + (weights[0].element_size() if weights else 0))
        return max(self._block, min(self._max_block, self._block_bytes // max(1, step)))

    def _block_slots(self, key: tuple, steps: int) -> tuple:
        """(layout, buffer, [(ids, weights, small) views of step t]) of a block of ``steps`` steps."""
        got = self._buffers.get(("slots", key, steps))
        if got is None:
            small_shape, rows, L, shape, ids_dtype, w_dtype, device = key
            fused = self._fuse and ids_dtype == torch.int64 and len(shape) == 2 and small_shape == (shape[0], 1)
            layout = Layout(steps, L, shape[0], shape[1], ids_dtype, w_dtype, rows, fused=fused)
            buf, v_ids, v_w, v_steps = _views(layout, device, small_shape)
            slots = [(v_ids[t] if fused else v_ids[t * L : (t + 1) * L],
                      None if v_w is None else v_w[t * L : (t + 1) * L],
                      None if fused else v_steps[t])
                     for t in range(steps)]
            got = self._keep(("slots", key, steps), (layout, buf, slots))
        return got

    @torch.no_grad()
    def drain(self) -> None:
        """Process every submitted step now (and wait for the worker)."""
        self._flush_group()
        self._run(keep=0)
        self._wait()

    close = drain

    def _deferrable(self, meta: Any, first: torch.Tensor) -> bool:
        ptr = first.data_ptr()
        if self._eager:
            if ptr in self._group_ptrs:
                self._group, self._group_ptrs = [], set()  # their routing was overwritten: never recorded
                raise CaptureError(
                    "capture: a MoE layer returned its routing at the address of a step still held, so the "
                    "model reuses a static buffer (CUDA graphs?) while decoding eagerly; recorded steps were "
                    "kept up to the last full block. Capture such a model with a static KV cache "
                    "(cache_implementation='static'), which records every step as it ends"
                )
            self._group_ptrs.add(ptr)
            return True
        last, self._last_ids = self._last_ids, first
        if last is not None and last.shape == first.shape and last.data_ptr() != ptr:
            self._eager, self._last_ids = True, None
            self._group_ptrs = {ptr}
            return True
        return False

    def _flush_group(self) -> None:
        if not self._group:
            return
        group, self._group, self._group_ptrs = self._group, [], set()
        if self._group_kind == "copied":
            layout, buf, _ = self._slots
            # slots past len(group) hold stale bytes: never decoded
            self._add(self._to_host(_Unit(group, layout, buf), event=True))
            return
        metas = [g[0] for g in group]
        ids = [t for g in group for t in g[1]]
        weights = None if group[0][2] is None else [t for g in group for t in g[2]]
        self._add(self._gather(metas, ids, weights, [g[3] for g in group], stacked=True))

    def _gather(self, metas: list, ids: list, weights: list | None, small: list, stacked: bool) -> _Unit:
        """One unit: every part stacked into one device byte buffer, then one copy to the host.

        ``ids`` and ``weights`` hold every layer of every step, step-major; ``small`` holds one step's
        ``(b, s)`` rows, or (``stacked``) one ``(rows, b, s)`` stack per step."""
        first = ids[0]
        rows, shape = (small[0].shape[0], tuple(small[0].shape[1:])) if stacked else (len(small), tuple(small[0].shape))
        key = (len(metas), len(ids), first.shape, _common(ids), None if weights is None else _common(weights),
               rows, shape, first.device)
        got = self._buffers.get(key)
        if got is None:
            layout = Layout(len(metas), len(ids) // len(metas), first.shape[0], first.shape[1], key[3], key[4], rows)
            buf, v_ids, v_w, v_steps = _views(layout, first.device, shape)
            got = self._keep(key, (layout, buf, v_ids, v_w, v_steps, v_steps[0]))
        layout, buf, v_ids, v_w, v_steps, v_step = got
        torch.stack(ids, out=v_ids)
        if weights is not None:
            torch.stack(weights, out=v_w)
        torch.stack(small, out=v_steps if stacked else v_step)
        last_of_block = len(metas) > 1 or self._pending_steps + 1 >= self._block or layout.nbytes >= self._big_bytes
        return self._to_host(_Unit(metas, layout, buf), event=last_of_block)

    @staticmethod
    def _to_host(unit: _Unit, event: bool) -> _Unit:
        """Start the copy of a unit's device buffer into pooled pinned memory, and record an event
        after it when asked (one covers every copy before it). On CPU the buffer itself is read."""
        if unit.host.is_cuda:
            unit.cuda = True
            buf, n = unit.host, unit.layout.nbytes
            unit.host = _PINNED.take(n)
            unit.host[:n].copy_(buf, non_blocking=True)
            if event:
                unit.event = torch.cuda.Event()
                unit.event.record()
        return unit

    def _keep(self, key: tuple, value: tuple) -> tuple:
        """Keep a device buffer and its views for reuse, on CUDA only: the copy that reads it and the
        stacks that next write it run in stream order. On CPU the buffer is what the host side reads,
        so each unit has its own."""
        if value[1].is_cuda:
            if len(self._buffers) >= 16:
                self._buffers.clear()
            self._buffers[key] = value
        return value

    def _add(self, unit: _Unit) -> None:
        self._pending.append(unit)
        self._pending_steps += len(unit.metas)
        # hand over a full block, or a big unit as soon as the next one is queued (its copy has landed)
        before = self._pending_steps - len(unit.metas)
        if before >= self._block or (len(self._pending) > 1 and self._pending[-2].layout.nbytes >= self._big_bytes):
            cut = len(self._pending) - 1
            # Processed here, a unit whose copy is still queued behind the step just launched would
            # stall this thread until the GPU finishes that step (a block flushed by the next
            # batch's prefill): it waits for the next hand-over unless more than four units (each
            # holding its own pinned buffer) are pending. The worker thread may wait.
            if (self._landed(cut) or len(self._pending) > 4
                    or sum(u.layout.nbytes for u in self._pending[:cut]) >= self._big_bytes):
                self._run(keep=1)

    def _landed(self, cut: int) -> bool:
        """Whether the copies of the first ``cut`` pending units have landed, without waiting: the
        first event recorded at or after unit ``cut - 1`` has completed (it covers every copy before it)."""
        for u in self._pending[cut - 1 :]:
            if not u.cuda:
                return True  # a CPU unit: nothing in flight
            if u.event is not None:
                return bool(u.event.query())
        return False

    # -- hand-over ------------------------------------------------------------------------------------
    def _wait(self) -> None:
        job, self._job = self._job, None
        if job is not None:
            job.result()  # re-raises what the worker raised

    def _run(self, keep: int) -> None:
        if len(self._pending) <= keep:
            return
        cut = len(self._pending) - keep
        taken, self._pending = self._pending[:cut], self._pending[cut:]
        self._pending_steps = sum(len(u.metas) for u in self._pending)
        try:
            self._wait()
        except BaseException:
            self._release(taken)
            raise
        event = taken[-1].event
        if event is None and taken[-1].host.is_pinned():
            event = torch.cuda.Event()  # recorded now: after every copy already queued
            event.record()
        if keep and sum(u.layout.nbytes for u in taken) >= self._big_bytes:
            if self._worker is None:
                from concurrent.futures import ThreadPoolExecutor

                self._worker = ThreadPoolExecutor(1, thread_name_prefix="moeprof-capture-host")
            self._job = self._worker.submit(self._finish, taken, event)
        else:
            self._finish(taken, event)

    def _finish(self, taken: list[_Unit], event: Any) -> None:
        try:
            if event is not None:
                event.synchronize()
            steps: list[Step] = []
            for u in taken:
                steps += decode(u.layout, u.host[: u.layout.nbytes].numpy(), u.metas)
            self._process(steps)
        finally:
            self._release(taken)

    @staticmethod
    def _release(taken: list[_Unit]) -> None:
        for u in taken:
            if u.host.is_pinned():
                _PINNED.give(u.host)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None


def _views(layout: Layout, device: torch.device, shape: tuple) -> tuple:
    """A new device byte buffer for ``layout`` and its typed views: ids ``(T*L, n, k)``, weights (or
    None) and the small rows ``(T, rows) + shape``, ``shape`` the step's ``(b, s)`` (``b * s == n``).

    Normal tensors even inside ``torch.inference_mode()``: buffers are reused across steps and
    captures, and one made there (or a dtype view of one) could not be written once the caller leaves
    inference mode. Slices of these views can, wherever they are made."""
    with torch.inference_mode(False):
        buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
        o, sizes = layout.offsets, layout.sizes
        T, L, n, k = layout.steps, layout.layers, layout.n, layout.k
        v_w = buf[o[1] : o[1] + sizes[1]].view(layout.w_dtype).view(T * L, n, k) if layout.w_dtype else None
        if layout.fused:  # ids and small rows in one part: (T, n, L*k + rows); no separate small rows
            return buf, buf[o[0] : o[0] + sizes[0]].view(torch.int64).view(T, n, L * k + layout.rows), v_w, None
        v_ids = buf[o[0] : o[0] + sizes[0]].view(layout.ids_dtype).view(T * L, n, k)
        return buf, v_ids, v_w, buf[o[2] : o[2] + sizes[2]].view(torch.int64).view((T, layout.rows) + tuple(shape))


def _common(tensors: list) -> torch.dtype:
    """The dtype every tensor fits in (the first's, unless a layer differs)."""
    dtype = tensors[0].dtype
    for t in tensors:
        if t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class PinnedPool:
    """Pinned host buffers kept for reuse by every capture of this process, by power-of-2 size class.

    Allocating pinned memory can synchronise the device and costs far more than a step's copy, so
    buffers outlive a capture: a benchmark or a server running many short captures allocates them
    once. At most ``max_bytes`` are kept.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._max_bytes = max_bytes

    def take(self, n: int) -> torch.Tensor:
        size_class = max(12, (n - 1).bit_length())
        with self._lock:
            bucket = self._free.get(size_class)
            if bucket:
                buf = bucket.pop()
                self._bytes -= buf.numel()
                return buf
        return self._allocate(1 << size_class)

    def give(self, buf: torch.Tensor) -> None:
        size = buf.numel()
        with self._lock:
            if self._bytes + size > self._max_bytes:
                return  # dropped: freed by torch when no longer referenced
            self._free.setdefault(size.bit_length() - 1, []).append(buf)
            self._bytes += size

    @staticmethod
    def _allocate(size: int) -> torch.Tensor:
        with torch.inference_mode(False):  # a normal tensor: reused by captures inside inference mode or not
            return torch.empty(size, dtype=torch.uint8, pin_memory=True)


_PINNED = PinnedPool()
