"""Which request each token of a packed forward pass belongs to, under transformers' continuous batching.

``model.generate_batch(...)`` and ``model.init_continuous_batching()`` (what ``transformers serve`` runs)
pack many requests into one forward pass: ``input_ids`` of shape ``(1, q)`` holds prefill chunks and
decode tokens of several requests back to back, split by ``cu_seq_lens_q``. The model sees no request
ids, so the capture learns them where the batch is built: the host-side batch builder
(``ContinuousBatchingIOs.prepare_batch_tensors``) is wrapped for the duration of a capture, and each
call leaves a :class:`BatchPlan` (request id, tokens already in the cache, tokens scheduled, prompt
length, in batch order). The next packed forward consumes exactly one plan; its ``position_ids`` are
checked against the plan on the host side, so a plan and a forward that do not match are an error,
never rows given to the wrong request.

A plan that is never consumed by a forward means the engine ran the step without calling the model
(a replayed CUDA graph): the capture stops with an error instead of losing the step silently.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from moeprof.errors import CaptureError

WARMUP_PREFIX = "__warmup_"
"""transformers names the fake requests of its CUDA-graph warm-up ``__warmup_{status}_{i}__``."""


@dataclass(frozen=True)
class BatchPlan:
    """One packed forward pass as the scheduler built it; arrays are ``(requests,)``, in batch order."""

    keys: tuple[str, ...]
    past: np.ndarray  # int64: tokens of the request already in the KV cache (its first position here)
    query: np.ndarray  # int64: tokens of the request in this forward pass
    prompt: np.ndarray  # int64: prompt length of the request (positions below it are prefill)
    warmup: bool

    @property
    def tokens(self) -> int:
        return int(self.query.sum())


def _io_classes() -> list[type]:
    try:
        from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs
    except ImportError:  # transformers without continuous batching (or a layout this adapter does not know)
        return []
    return [ContinuousBatchingIOs]


class PlanTap:
    """Collects :class:`BatchPlan` s while installed; thread-safe (the engine builds batches in its own thread)."""

    def __init__(self) -> None:
        self._plans: list[BatchPlan] = []
        self._lock = threading.Lock()
        self._saved: list[tuple[type, Callable]] = []
        self.error: CaptureError | None = None
        self.refuse: CaptureError | None = None  # set while the capture is paused: a batch built then is this error

    @property
    def supported(self) -> bool:
        return bool(self._saved)

    def install(self) -> None:
        for cls in _io_classes():
            original = cls.prepare_batch_tensors
            self._saved.append((cls, original))
            cls.prepare_batch_tensors = self._wrap(original)

    def remove(self) -> None:
        for cls, original in self._saved:
            cls.prepare_batch_tensors = original
        self._saved.clear()

    def _wrap(self, original: Callable) -> Callable:
        tap = self

        def prepare_batch_tensors(io: Any, requests_in_batch: Any, *args: Any, **kwargs: Any) -> Any:
            # Read before the call: it advances each request's position_offset past this batch.
            plan = _plan_of(requests_in_batch)
            result = original(io, requests_in_batch, *args, **kwargs)
            tap.push(plan)
            return result

        prepare_batch_tensors.__wrapped__ = original  # type: ignore[attr-defined]
        return prepare_batch_tensors

    def push(self, plan: BatchPlan) -> None:
        # Never raise here: this runs inside the engine's loop, which would turn the error into failed
        # requests. The recorder raises ``error`` at the next forward and at close instead.
        with self._lock:
            if self.refuse is not None:
                self.error = self.error or self.refuse
                return
            if self._plans and not self._plans[-1].warmup and self.error is None:
                lost = self._plans[-1]
                self.error = CaptureError(
                    f"capture: continuous batching built a batch of {len(lost.keys)} request(s) that never reached "
                    "the model's forward (a replayed CUDA graph?); capture sees only eager forwards: run "
                    "continuous batching without CUDA graphs"
                )
            self._plans = [plan]

    def pop(self) -> BatchPlan | None:
        with self._lock:
            return self._plans.pop() if self._plans else None


def _plan_of(requests_in_batch: Any) -> BatchPlan:
    keys, past, query, prompt = [], [], [], []
    for future_state in requests_in_batch:
        state = future_state.state
        keys.append(str(state.request_id))
        past.append(int(state.position_offset))
        query.append(int(future_state.query_length))
        # A request soft-reset after CPU offloading re-prefills its generated tokens; its true prompt
        # length is kept apart then.
        true_prompt = int(getattr(state, "_true_initial_tokens", 0) or 0)
        prompt.append(true_prompt or len(state.initial_tokens))
    return BatchPlan(
        keys=tuple(keys),
        past=np.asarray(past, np.int64),
        query=np.asarray(query, np.int64),
        prompt=np.asarray(prompt, np.int64),
        warmup=bool(keys) and all(k.startswith(WARMUP_PREFIX) for k in keys),
    )


def is_packed_forward(kwargs: dict) -> bool:
    """True for a forward pass of continuous batching (several requests packed into one row)."""
    return kwargs.get("cu_seq_lens_q") is not None
