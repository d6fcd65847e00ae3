"""Megatron-Core: router trace JSONL (``--moe-routing-trace-path``) and tokens-per-expert JSONL.

Router trace, read from NVIDIA/Megatron-LM ``megatron/core/transformer/moe/router_trace.py``
(``RouterTracer._make_index_record`` / ``_flush_records_to_disk``; enabled by
``--moe-routing-trace-path DIR`` in training (``megatron/training/config/training_config.py``) and in
inference (``examples/inference/README.md``)). Each rank writes ``DIR/router_trace_rank{rank}.jsonl``,
one record per (step, block, layer)::

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 8, "top_indices": [[12, 45, ...], ...]}

``layer`` is N of the router's module name ``decoder.layers.N.mlp.router`` (0-based, local to the
pipeline stage); MTP records carry ``block: "mtp"`` and ``mtp_idx`` (not model layers: skipped).
Optional sidecar offsets (``hs_offset``, ``logit_offset``, ...) are ignored. The trace has expert ids
only: no weights, no request ids, no token ids or positions, no prefill/decode phase.

Tokens per expert, read from ``megatron/training/activation_logging.py``
(``ActivationLogger.save_tpe``; enabled by ``--save-tokens-per-expert-interval N`` with ``--save DIR``).
Each rank appends to ``DIR/tokens_per_expert/rank{rank}.jsonl``::

    {"iter": 100, "block": "decoder", "layer": 3, "tpe": [[128, 64], [96, 80]]}

``tpe`` holds, per micro-batch, the ``tokens_per_expert`` argument of the experts' ``linear_fc1``:
counts for this rank's *local* experts. Imported as ``loads`` (window = one (iter, micro-batch)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from moeprof.importers.base import (
    PREFILL,
    WARMUP_IDENTICAL,
    Importer,
    LoadsChunk,
    RoutingChunk,
    bad,
    identical_routing,
)
from moeprof.importers.jsonl import _first_json_line, json_records

_NO_PHASE = "Megatron's router trace does not say whether a step was prefill or decode (or training)"


def _records(path: Path, progress: Callable[[int], None]) -> Iterator[tuple[int, dict[str, Any]]]:
    return json_records(path, progress, "JSONL log")


class MegatronRouterTraceImporter(Importer):
    name = "megatron"
    source = "megatron"
    description = "Megatron-Core router trace JSONL (router_trace_rank{N}.jsonl, --moe-routing-trace-path)"

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        first = _first_json_line(head)
        return isinstance(first, dict) and "top_indices" in first and "layer" in first

    def read(self, path: Path, progress: Callable[[int], None]) -> Iterator[RoutingChunk]:
        pending: list[tuple[int, dict[str, Any], np.ndarray]] = []
        unit: tuple[Any, Any] | None = None
        rows = 0
        for lineno, rec in _records(path, progress):
            where = f"line {lineno}"
            for key in ("step", "layer", "top_indices"):
                if key not in rec:
                    raise bad(path, where, f"field {key!r} is missing; not a Megatron router trace record")
            if rec.get("block", "decoder") != "decoder":
                self.skip("MTP-head router records (block 'mtp': not a model layer)", int(rec.get("num_tokens", 0)))
                continue
            ids = self._indices(rec, path, where)
            key = (rec.get("rank", 0), rec["step"])
            if pending and (key != unit or rows >= self.options.chunk_rows):
                yield self._chunk(pending, path)
                pending, rows = [], 0
            unit = key
            pending.append((lineno, rec, ids))
            rows += ids.shape[0]
        if pending:
            yield self._chunk(pending, path)
        self.missing.update(
            {
                "weights": "Megatron's router trace records top-k indices only",
                "request_ids": "Megatron's router trace has no request ids (tokens of a step are one flat batch)",
                "token_id": "Megatron's router trace has no token ids",
                "positions": "Megatron's router trace has no token positions (pos = index within the record)",
                "phase": _NO_PHASE,
            }
        )
        self.note("layer = N of decoder.layers.N (local to the pipeline stage when pipeline parallelism is on); "
                  "batch_id = step")

    def _indices(self, rec: dict[str, Any], path: Path, where: str) -> np.ndarray:
        top = rec["top_indices"]
        if not isinstance(top, list):
            raise bad(path, where, "'top_indices' must be a list of per-token expert id lists")
        try:
            ids = np.asarray(top, dtype=np.int64)
        except (ValueError, TypeError):
            raise bad(path, where, "inconsistent top-k: tokens list different numbers of expert ids") from None
        n = rec.get("num_tokens")
        if ids.size == 0:
            ids = ids.reshape(0, int(rec.get("topk") or 1))
        if ids.ndim != 2:
            raise bad(path, where, "inconsistent top-k: tokens list different numbers of expert ids")
        if n is not None and int(n) != ids.shape[0]:
            raise bad(path, where, f"num_tokens says {n} but top_indices holds {ids.shape[0]} tokens")
        k = rec.get("topk")
        if k is not None and int(k) != ids.shape[1]:
            raise bad(path, where, f"inconsistent top-k: topk says {k} but tokens list {ids.shape[1]} ids")
        limit = self.options.num_experts
        if limit and ids.size and (ids.max() >= limit or ids.min() < 0):
            e = int(ids.max()) if ids.max() >= limit else int(ids.min())
            raise bad(path, where, f"expert id {e} is out of range for {limit} experts (ids run 0..{limit - 1}); "
                      "check --num-experts")
        return ids

    def _chunk(self, pending, path: Path) -> RoutingChunk:
        experts = np.concatenate([p[2] for p in pending])
        layer = np.concatenate([np.full(p[2].shape[0], int(p[1]["layer"]), np.int64) for p in pending])
        pos = np.concatenate([np.arange(p[2].shape[0]) for p in pending])
        step = np.concatenate([np.full(p[2].shape[0], int(p[1]["step"]), np.int64) for p in pending])
        n = experts.shape[0]
        return RoutingChunk(
            request_key=[None] * n,
            step=step.astype(np.int32),
            phase=np.full(n, PREFILL, np.int8),
            pos=pos.astype(np.int32),
            layer=layer,
            experts=experts,
            where=f"{path}: lines {pending[0][0]}-{pending[-1][0]}",
            batch_id=step,
            warmup=WARMUP_IDENTICAL if identical_routing(layer, experts) else None,
        )


class MegatronTokensPerExpertImporter(Importer):
    name = "megatron-tpe"
    source = "megatron"
    description = "Megatron tokens-per-expert JSONL (tokens_per_expert/rank{N}.jsonl, --save-tokens-per-expert-interval)"

    def __init__(self, options) -> None:
        super().__init__(options)
        self._windows: dict[tuple[int, int], int] = {}
        self._local: int | None = None

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        first = _first_json_line(head)
        return isinstance(first, dict) and "tpe" in first and "iter" in first

    def read(self, path: Path, progress: Callable[[int], None]) -> Iterator[LoadsChunk]:
        stated = self.options.num_experts
        for lineno, rec in _records(path, progress):
            where = f"line {lineno}"
            for key in ("iter", "layer", "tpe"):
                if key not in rec:
                    raise bad(path, where, f"field {key!r} is missing; not a Megatron tokens-per-expert record")
            if rec.get("block", "decoder") != "decoder":
                self.skip("MTP-head records (block 'mtp': not a model layer)", 1)
                continue
            tpe = rec["tpe"]
            try:
                counts = np.asarray(tpe, dtype=np.int64)
            except (ValueError, TypeError):
                raise bad(path, where, "'tpe' rows have different lengths") from None
            if counts.ndim != 2 or counts.shape[0] == 0:
                raise bad(path, where, "'tpe' must be a list of per-micro-batch count lists")
            width = counts.shape[1]
            if self._local is None:
                self._local = width
            elif width != self._local:
                raise bad(path, where, f"{width} experts per micro-batch here, {self._local} on earlier lines")
            if stated and width != stated:
                raise bad(path, where, (
                    f"rows hold {width} experts but --num-experts is {stated}: this file is one "
                    f"expert-parallel rank's local slice; import it with --num-experts {width}"
                    if width < stated else f"rows hold {width} experts, more than --num-experts {stated}"))
            if (counts < 0).any():
                raise bad(path, where, "negative token count")
            it, lay = int(rec["iter"]), int(rec["layer"])
            mb, expert = np.nonzero(counts >= 0)
            win = np.array([self._window(it, int(m)) for m in range(counts.shape[0])], np.int64)[mb]
            n = mb.size
            table = pa.table({
                "window": pa.array(win),
                "phase": pa.nulls(n, pa.dictionary(pa.int8(), pa.string())),
                "layer": pa.array(np.full(n, lay, np.int16)),
                "expert": pa.array(expert.astype(np.int16)),
                "count": pa.array(counts[mb, expert]),
                "request_id": pa.nulls(n, pa.int64()),
                "domain": pa.nulls(n, pa.string()),
            })
            yield LoadsChunk(table=table, where=f"{path}: {where}")
        self.num_experts = self.num_experts or self._local
        reason = "Megatron's tokens-per-expert log keeps counts per micro-batch only"
        for cap in ("per_token", "request_ids", "positions", "token_id", "weights", "batch_id"):
            self.missing[cap] = reason
        self.missing["phase"] = "training iterations have no prefill/decode phase"
        self.note("window = one (iteration, micro-batch) in the order first seen; expert ids are this rank's "
                  "local experts (0-based) when expert parallelism splits them")

    def _window(self, it: int, mb: int) -> int:
        return self._windows.setdefault((it, mb), len(self._windows))
