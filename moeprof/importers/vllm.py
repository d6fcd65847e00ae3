"""vLLM routed experts, as vLLM returns them with ``--enable-return-routed-experts``.

Read from vllm-project/vllm:

* ``vllm/model_executor/layers/fused_moe/routed_experts_capturer.py`` (``RoutedExpertsCapturer``): the
  buffer is int32 ``(tokens, hf_config.num_hidden_layers, num_experts_per_tok)``, written per layer by
  ``capture(layer_id, topk_ids)``; layers that never call it (dense layers) stay zero.
* ``vllm/outputs.py``: ``CompletionOutput.routed_experts: np.ndarray | None  # [seq_len,layer_num,topk]``
  (offline ``LLM.generate``).
* ``vllm/entrypoints/openai/completion/protocol.py``: ``CompletionResponseChoice.routed_experts: str``,
  "base64-encoded .npy bytes ... shape (num_tokens - 1, num_layers, num_experts_per_tok)" because the
  last sampled token is never forwarded. Older servers (docs v0.21 "Routed Experts Replay") returned
  nested lists split in two: response-level ``prompt_routed_experts`` ``[prompt_len, layers, top_k]``
  and per-choice ``routed_experts`` ``[gen_len, layers, top_k]``.

vLLM writes no file itself; people save what it returns. This importer reads JSONL (or one JSON
document) with one request per line, in either shape:

* an OpenAI response body (``id``, ``choices[i].routed_experts``, ``usage.prompt_tokens``, optional
  ``prompt_routed_experts``, ``prompt_token_ids``, ``choices[i].token_ids``), or
* a saved ``RequestOutput`` (``request_id``, ``prompt_token_ids``, ``outputs[i].routed_experts``,
  ``outputs[i].token_ids``).

Row t of the array is token t of prompt + completion: ``t < prompt_len`` is prefill, the rest decode
step ``t - prompt_len + 1``. vLLM returns expert ids only (no weights, no batch ids).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from moeprof.importers.base import (
    DECODE,
    PREFILL,
    WARMUP_IDENTICAL,
    Importer,
    RoutingChunk,
    bad,
    identical_routing,
)
from moeprof.importers.jsonl import _first_json_line, _json_loads


def _has_routing(obj: Any) -> bool:
    if not isinstance(obj, dict):
        return False
    if "prompt_routed_experts" in obj or "routed_experts" in obj:
        return True
    for key in ("choices", "outputs"):
        items = obj.get(key)
        if isinstance(items, list) and items and isinstance(items[0], dict) and "routed_experts" in items[0]:
            return True
    return False


def decode_array(value: Any, path: Path, where: str, what: str) -> np.ndarray | None:
    """A routed-experts array from base64 ``.npy`` text or nested lists; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except (binascii.Error, ValueError, OSError, EOFError) as exc:
            raise bad(path, where, f"{what}: not base64-encoded .npy bytes (cut off or corrupted)") from None
    else:
        try:
            arr = np.asarray(value)
        except ValueError:
            raise bad(path, where, f"{what}: inconsistent top-k: rows of different lengths") from None
    if arr.size == 0:
        return np.zeros((0, 0, 0), np.int64)
    if arr.ndim != 3 or arr.dtype.kind not in "iu":
        raise bad(path, where, f"{what}: expected integer [tokens, layers, top_k], got shape {arr.shape} "
                  f"of {arr.dtype}" + (" (inconsistent top-k?)" if arr.dtype == object else ""))
    return arr.astype(np.int64, copy=False)


class VLLMImporter(Importer):
    name = "vllm"
    source = "vllm"
    description = "vLLM routed experts (--enable-return-routed-experts): saved responses / RequestOutputs, JSONL"

    def __init__(self, options) -> None:
        super().__init__(options)
        self._layers: int | None = None
        self._dense: set[int] = set()

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        first = _first_json_line(head)
        if first is None and head.lstrip()[:1] in (b"{", b"["):
            return b'"routed_experts"' in head
        return _has_routing(first)

    def read(self, path: Path, progress: Callable[[int], None]) -> Iterator[RoutingChunk]:
        for where, obj in self._documents(path, progress):
            yield from self._request(obj, path, where)
        self.missing.update(
            {
                "weights": "vLLM returns routed expert ids only, not routing weights",
                "batch_id": "vLLM's routed experts are per request; which forward pass carried a token is not kept",
            }
        )
        self.note("layer = index along vLLM's routed_experts layer axis (hf_config.num_hidden_layers in "
                  "RoutedExpertsCapturer); all-zero layers (dense layers) are left out")
        self.note("with prefix caching, rows of cached prompt tokens are the routing of the request that "
                  "first computed them")

    def _documents(self, path: Path, progress) -> Iterator[tuple[str, Any]]:
        with open(path, "rb") as fh:
            first = fh.read(1 << 16)
            fh.seek(0)
            stripped = first.lstrip()
            if stripped[:1] == b"[" or (stripped[:1] == b"{" and _first_json_line(first) is None):
                # One JSON document (a list of requests or a pretty-printed response).
                data = fh.read()
                progress(len(data))
                try:
                    doc = json.loads(data)
                except ValueError as exc:
                    raise bad(path, "document", "not valid JSON (cut off, or not a saved vLLM response)") from None
                items = doc if isinstance(doc, list) else [doc]
                for i, item in enumerate(items, start=1):
                    yield f"record {i}", item
                return
            for lineno, raw in enumerate(fh, start=1):
                progress(len(raw))
                if not raw.strip():
                    continue
                try:
                    yield f"line {lineno}", _json_loads(raw)
                except ValueError as exc:
                    raise bad(path, f"line {lineno}", "not valid JSON (the file is cut off here, or not "
                              "a saved vLLM response)") from None

    def _request(self, obj: Any, path: Path, where: str) -> Iterator[RoutingChunk]:
        if not _has_routing(obj):
            raise bad(path, where, "no routed_experts found (expected choices[i].routed_experts, "
                      "outputs[i].routed_experts or prompt_routed_experts); was the server started with "
                      "--enable-return-routed-experts?")
        rid = obj.get("id", obj.get("request_id"))
        if rid is None:
            raise bad(path, where, "no request id ('id' or 'request_id')")
        prompt_ids = obj.get("prompt_token_ids")
        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
        prompt_split = decode_array(obj.get("prompt_routed_experts"), path, where, "prompt_routed_experts")
        choices = obj.get("choices") if isinstance(obj.get("choices"), list) else obj.get("outputs")
        if not isinstance(choices, list):
            choices = [obj]
        for j, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise bad(path, where, f"choice {j} is not an object")
            arr = decode_array(choice.get("routed_experts"), path, where, f"choice {j} routed_experts")
            p_ids = choice.get("prompt_token_ids", prompt_ids)
            out_ids = choice.get("token_ids")
            if prompt_split is not None:
                plen = prompt_split.shape[0]
                arr = prompt_split if arr is None or arr.size == 0 else np.concatenate([prompt_split, arr])
            else:
                if arr is None:
                    self.skip("choices without routed_experts (aborted before any forward pass)", 0)
                    continue
                plen = usage.get("prompt_tokens", len(p_ids) if isinstance(p_ids, list) else None)
                if plen is None:
                    raise bad(path, where, "the prompt length is unknown: no usage.prompt_tokens, "
                              "prompt_token_ids or prompt_routed_experts")
                plen = int(plen)
            key = rid if len(choices) == 1 else f"{rid}#{choice.get('index', j)}"
            yield from self._rows(arr, plen, key, p_ids, out_ids, path, where)

    def _rows(self, arr, plen, key, p_ids, out_ids, path, where) -> Iterator[RoutingChunk]:
        n_tok, n_layers, k = arr.shape
        if n_tok == 0:
            return
        limit = self.options.num_experts
        if limit and arr.max() >= limit:
            raise bad(path, where, f"expert id {int(arr.max())} is out of range for {limit} experts "
                      f"(ids run 0..{limit - 1}); check --num-experts")
        if self._layers is None:
            self._layers = n_layers
            self.num_layers = self.num_layers or n_layers
        elif n_layers != self._layers:
            raise bad(path, where, f"routed_experts has {n_layers} layers here, {self._layers} in earlier records")
        zero_layer = ~arr.any(axis=(0, 2))
        for lay in np.flatnonzero(zero_layer).tolist():
            self._dense.add(lay)
        if zero_layer.all():
            self.skip("requests whose routed_experts are all zero", n_tok * n_layers)
            return
        keep = np.flatnonzero(~zero_layer)
        self.skip("all-zero layer rows (dense layers in vLLM's per-layer buffer)", n_tok * int(zero_layer.sum()))
        tok = np.repeat(np.arange(n_tok), keep.size)
        lay = np.tile(keep, n_tok)
        experts = arr[tok, lay]
        phase = np.where(tok < plen, PREFILL, DECODE).astype(np.int8)
        step = np.where(tok < plen, 0, tok - plen + 1).astype(np.int32)
        token_id = None
        if isinstance(p_ids, list) and isinstance(out_ids, list):
            seq = np.asarray(list(p_ids) + list(out_ids), dtype=np.int64)
            if seq.size >= n_tok:
                token_id = seq[tok]
        if token_id is None:
            self.missing["token_id"] = "the saved responses lack prompt_token_ids/token_ids (request them with return_token_ids)"
        chunk = RoutingChunk(
            request_key=[key] * tok.size,
            step=step,
            phase=phase,
            pos=tok.astype(np.int32),
            layer=lay,
            experts=experts,
            where=f"{path}: {where}",
            token_id=token_id,
        )
        if identical_routing(lay, experts, token_id):
            chunk.warmup = WARMUP_IDENTICAL
        yield chunk
