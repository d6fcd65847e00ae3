"""Trace rows from one forward pass of a serving engine: engine-neutral, numpy only.

A serving engine runs each forward pass over one flat batch of tokens from several requests: some
in prefill (the whole prompt, or one chunk of it under chunked prefill), some decoding one token.
An engine adapter describes a pass with a :class:`StepLayout` (per request, in the pass's token
order: its trace id, how many tokens it has in this pass, how many of its tokens were computed
before, its prompt length) and hands over the expert ids its MoE layers chose, ``(L, n, k)``;
:func:`routing_columns` turns them into the columns of :meth:`TraceWriter.write_routing`.

Glossary (positions are 0-based token indices within one request's sequence):

prompt length ``P``
    Tokens of the request's prompt.
phase
    A token at position ``p < P`` is ``prefill`` (step 0), whichever pass and chunk carried it;
    ``p >= P`` is a generated token fed back to the model: ``decode``, step ``p - P + 1``.
fresh token
    A position the trace has not recorded yet. Engines recompute tokens they already ran when a
    preempted request resumes; :class:`PositionLedger` keeps only the first computation, so a
    request has exactly one row per (position, MoE layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PREFILL, DECODE = 0, 1


@dataclass(frozen=True)
class StepLayout:
    """The requests of one forward pass, in the pass's token order. Every array has shape ``(r,)``."""

    request_ids: np.ndarray
    """Trace request ids (int64)."""
    num_tokens: np.ndarray
    """Tokens of each request in this pass (its tokens are contiguous in the batch)."""
    start_pos: np.ndarray
    """Position of each request's first token in this pass (= tokens computed before it)."""
    prompt_len: np.ndarray
    """Prompt length ``P`` of each request."""

    @classmethod
    def of(cls, request_ids: Any, num_tokens: Any, start_pos: Any, prompt_len: Any) -> "StepLayout":
        return cls(
            np.asarray(request_ids, dtype=np.int64),
            np.asarray(num_tokens, dtype=np.int64),
            np.asarray(start_pos, dtype=np.int64),
            np.asarray(prompt_len, dtype=np.int64),
        )

    @property
    def num_requests(self) -> int:
        return int(self.request_ids.shape[0])

    @property
    def num_batch_tokens(self) -> int:
        return int(self.num_tokens.sum())

    def token_index(self) -> np.ndarray:
        """``(n,)``: the request (index into this layout) of each token of the pass."""
        return np.repeat(np.arange(self.num_requests), self.num_tokens)

    def positions(self) -> np.ndarray:
        """``(n,)``: each token's position in its request."""
        req = self.token_index()
        starts = np.cumsum(self.num_tokens) - self.num_tokens
        return self.start_pos[req] + (np.arange(req.shape[0]) - starts[req])


def token_columns(layout: StepLayout) -> dict[str, np.ndarray]:
    """Per-token ``request_id``, ``pos``, ``phase`` (0 prefill, 1 decode) and ``step``, each ``(n,)``."""
    req = layout.token_index()
    pos = layout.positions()
    prompt = layout.prompt_len[req]
    decode = pos >= prompt
    return {
        "request_id": layout.request_ids[req],
        "pos": pos,
        "phase": decode.astype(np.int8),
        "step": np.where(decode, pos - prompt + 1, 0),
    }


def routing_columns(
    layout: StepLayout,
    experts: np.ndarray,
    layers: np.ndarray,
    *,
    batch_id: int | None = None,
    token_ids: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    keep: np.ndarray | None = None,
) -> dict[str, Any]:
    """The routing rows of one pass, layer-major (all tokens of ``layers[0]`` first, in pass order).

    ``experts`` ``(L, n, k)`` and ``weights`` ``(L, n, k)`` or ``None``; ``layers`` ``(L,)`` model layer
    indices; ``token_ids`` ``(n,)`` or ``None``; ``keep`` ``(n,)`` bool selects the tokens to record
    (``None``: all). Returns keyword columns for :meth:`TraceWriter.write_routing`.
    """
    L, n, k = experts.shape
    if n != layout.num_batch_tokens:
        raise ValueError(f"experts cover {n} tokens, the layout {layout.num_batch_tokens}")
    cols = token_columns(layout)
    sel = np.arange(n) if keep is None else np.flatnonzero(keep)
    m = sel.shape[0]

    def per_token(a: np.ndarray) -> np.ndarray:
        return np.tile(a[sel], L)

    out: dict[str, Any] = {name: per_token(a) for name, a in cols.items()}
    out["layer"] = np.repeat(np.asarray(layers, dtype=np.int16), m)
    out["experts"] = experts[:, sel, :].reshape(L * m, k)
    out["weights"] = None if weights is None else weights[:, sel, :].reshape(L * m, k)
    out["batch_id"] = None if batch_id is None else np.full(L * m, batch_id, dtype=np.int64)
    out["token_id"] = None if token_ids is None else per_token(np.asarray(token_ids))
    return out


class PositionLedger:
    """Remembers, per request, the first position not yet recorded, so each position is recorded once."""

    def __init__(self) -> None:
        self._next: dict[int, int] = {}
        self.recomputed = 0
        """Token positions seen again (recomputation after preemption) and not recorded twice."""

    def fresh(self, layout: StepLayout) -> np.ndarray:
        """``(n,)`` bool: tokens of this pass at positions not recorded before; marks them recorded."""
        req = layout.token_index()
        pos = layout.positions()
        seen = np.array([self._next.get(int(r), 0) for r in layout.request_ids], dtype=np.int64)
        keep = pos >= seen[req]
        for i, rid in enumerate(layout.request_ids.tolist()):
            if layout.num_tokens[i]:
                end = int(layout.start_pos[i] + layout.num_tokens[i])
                self._next[rid] = max(self._next.get(rid, 0), end)
        self.recomputed += int((~keep).sum())
        return keep

    def forget(self, request_id: int) -> None:
        self._next.pop(int(request_id), None)
