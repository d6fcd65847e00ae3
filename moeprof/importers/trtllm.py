"""TensorRT-LLM's expert statistics dump (``EXPERT_STATISTIC_ITER_RANGE`` / ``EXPERT_STATISTIC_PATH``).

Read from NVIDIA/TensorRT-LLM:

* ``tensorrt_llm/_torch/expert_statistic.py`` (``ExpertStatistic``): enabled when
  ``EXPERT_STATISTIC_ITER_RANGE=start-stop`` is set; for every iteration ``start <= iter < stop`` and
  every MoE layer it adds ``torch.bincount(token_selected_experts.flatten(), minlength=expert_count)``
  into ``records[f"{iter}_{layer}"]``. When the iteration counter reaches ``stop`` each rank saves
  ``safetensors.torch.save_file(records, f"{path}/rank{rank}.safetensors")`` and rank 0 writes
  ``{path}/meta_info.json`` = ``{"num_experts": expert_count, "num_experts_per_token": k}``
  (``path`` = ``EXPERT_STATISTIC_PATH``, default ``expert_statistic``).
* ``tensorrt_llm/_torch/modules/fused_moe/*``: ``ExpertStatistic.set_layer(self.layer_idx)`` (the model's
  layer index) then ``maybe_add_info(self.num_slots, token_selected_slots)``: "If load balancer is
  disabled, the statistics are collected from expert IDs. If load balancer is enabled, the statistics
  are collected from expert slot IDs", so with the MoE load balancer on, ``num_experts`` is the slot
  count and the ids are slots.
* ``examples/wide_ep/ep_load_balancer/utils.py`` (``load_expert_statistic``): readers sum the
  ``rank*.safetensors`` files key by key (each rank counts the tokens it routed, under attention DP).

Each ``rank{r}.safetensors`` is imported as count rows (the ``loads`` tables): window = iteration,
layer = layer index, one row per expert. Pass every rank's file: rows of the same window and layer
add up, as TensorRT-LLM's own reader sums them. ``meta_info.json`` is read from the files' directory.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from moeprof.importers.base import Importer, LoadsChunk, bad

_KEY = re.compile(r"^(\d+)_(\d+)$")
META_FILE = "meta_info.json"


def _header(head: bytes) -> dict | None:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), or ``None``."""
    if len(head) < 10:
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n <= 0 or n > len(head) - 8 or head[8:9] != b"{":
        return None
    try:
        obj = json.loads(head[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


class TrtllmExpertStatisticImporter(Importer):
    name = "trtllm"
    source = "trtllm"
    description = "TensorRT-LLM expert statistics (EXPERT_STATISTIC_PATH: meta_info.json + rank{r}.safetensors)"

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        header = _header(head)
        if header is None:
            return False
        keys = [k for k in header if k != "__metadata__"]
        return bool(keys) and all(_KEY.match(k) for k in keys)

    def read(self, path: Path, progress: Callable[[int], None]) -> Iterator[LoadsChunk]:
        with open(path, "rb") as fh:
            if _header(fh.read(1 << 20)) is None:
                raise bad(path, "file", "not a safetensors file (TensorRT-LLM writes rank{r}.safetensors)")
        self._meta(path)
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise bad(path, "file", "reading safetensors needs the safetensors package: pip install safetensors") from None
        try:
            records = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise bad(path, "file", f"not a readable safetensors file ({exc})") from None
        progress(path.stat().st_size)
        E = self.num_experts
        keyed = []
        for key, counts in records.items():
            m = _KEY.match(key)
            if m is None:
                raise bad(path, f"tensor {key!r}", "not an '{iter}_{layer}' key of TensorRT-LLM's expert statistics")
            if counts.ndim != 1:
                raise bad(path, f"tensor {key!r}", (
                    f"shape {list(counts.shape)}: expected per-expert counts [num_experts]; raw per-token "
                    "dumps (rank*_raw.safetensors) are not this format"))
            if counts.shape[0] != E:
                raise bad(path, f"tensor {key!r}", f"{counts.shape[0]} counts, but {self._meta_where} says {E} experts")
            if counts.dtype.kind not in "iu" or (counts < 0).any():
                raise bad(path, f"tensor {key!r}", "counts must be non-negative integers")
            keyed.append((int(m.group(1)), int(m.group(2)), counts.astype(np.int64)))
        if not keyed:
            raise bad(path, "file", "holds no '{iter}_{layer}' counts")
        keyed.sort(key=lambda t: (t[0], t[1]))
        it = np.repeat([k[0] for k in keyed], E)
        layer = np.repeat([k[1] for k in keyed], E)
        n = it.size
        table = pa.table({
            "window": pa.array(it.astype(np.int64)),
            "phase": pa.nulls(n, pa.dictionary(pa.int8(), pa.string())),
            "layer": pa.array(layer.astype(np.int16)),
            "expert": pa.array(np.tile(np.arange(E, dtype=np.int16), len(keyed))),
            "count": pa.array(np.concatenate([k[2] for k in keyed])),
            "request_id": pa.nulls(n, pa.int64()),
            "domain": pa.nulls(n, pa.string()),
        })
        iters = sorted({k[0] for k in keyed})
        rank = re.search(r"rank(\d+)", path.name)
        self.capture.setdefault("iterations", {})[path.name] = [iters[0], iters[-1] + 1]
        self.note(
            "counts per expert slot: logical experts unless TensorRT-LLM's MoE load balancer was on "
            "(then num_experts is the slot count)"
        )
        if rank:
            self.note(f"{path.name}: rank {rank.group(1)}, iterations {iters[0]}..{iters[-1]}")
        reason = "TensorRT-LLM's expert statistics keep counts per iteration and layer only"
        for cap in ("per_token", "request_ids", "positions", "token_id", "weights", "batch_id", "phase"):
            self.missing[cap] = reason
        yield LoadsChunk(table=table, where=f"{path}")

    def _meta(self, path: Path) -> None:
        meta = path.parent / META_FILE
        self._meta_where = str(meta)
        if not meta.exists():
            if self.options.num_experts and self.options.top_k:
                self.num_experts, self.top_k = self.options.num_experts, self.options.top_k
                self._meta_where = "--num-experts"
                return
            raise bad(path, "file", (
                f"{meta} not found: TensorRT-LLM's rank 0 writes it into EXPERT_STATISTIC_PATH beside "
                "rank0.safetensors; copy it beside this file, or pass --num-experts and --top-k"))
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
            E, k = int(info["num_experts"]), int(info["num_experts_per_token"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise bad(meta, "file", f"expected {{\"num_experts\": N, \"num_experts_per_token\": K}} ({exc!r})") from None
        if self.options.num_experts and self.options.num_experts != E:
            raise bad(meta, "num_experts", f"{E}, but --num-experts is {self.options.num_experts}")
        self.num_experts, self.top_k = E, k
