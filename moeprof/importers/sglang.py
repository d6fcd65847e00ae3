"""SGLang expert distribution recorder dumps (``expert_distribution_recorder_*.pt``).

Read from sgl-project/sglang ``python/sglang/srt/eplb/expert_distribution.py`` (the recorder:
``_StatAccumulator.dump`` / ``_DetailAccumulator.dump`` / ``_DetailSinglePassGatherer.collect`` /
``_SelectExpertsSinglePassGatherer``) and ``python/sglang/srt/model_executor/forward_batch_info.py``
(``ForwardMode``). The server writes them with ``torch.save`` into
``$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`` when ``/dump_expert_distribution_record`` is called,
for ``--expert-distribution-recorder-mode``:

``stat`` / ``stat_approx``
    ``{"rank": int, "logical_count": int tensor (passes, num_layers, num_logical_experts),
    "average_utilization_rate_over_window": float | None}``, written by rank 0 after an all-reduce
    over ranks. One row per buffered forward pass; with a circular buffer
    (``--expert-distribution-recorder-buffer-size`` >= 0) unfilled rows are all zero and rows are in
    ring order. Imported as ``loads`` (window = row). No phase, requests, tokens or weights.
``per_pass``
    ``{"records": [{"forward_pass_id", "rank", "gatherer_key", "global_physical_count":
    int tensor (num_layers, num_physical_experts)}], "last_physical_to_logical_map":
    int tensor (num_layers, num_physical_experts)}``, one file per rank. Imported as ``loads``
    (window = forward_pass_id), physical ids mapped to logical.
``per_token``
    the same with, per record, ``input_ids`` / ``positions`` (lists of length T),
    ``extend_seq_lens`` (list or None), ``forward_mode`` (``ForwardMode`` value: 1 EXTEND,
    2 DECODE, 3 MIXED, 4 IDLE, 5 TARGET_VERIFY, ...), ``topk_ids_of_layer`` int32 tensor
    (num_layers, T, 8) of *physical* expert ids padded with -1 (the gatherer's buffer is 8 wide and
    reset to -1; dense layers stay all -1), and ``misc_objects``. Imported as routing rows: one per
    (token, MoE layer), logical ids via ``last_physical_to_logical_map[layer, id]``.

The recorder does not dump request ids (``rids`` is commented out in ``on_forward_pass_start``), so a
"request" here is one sequence of one forward pass, and the manifest says so.

Loading uses ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from moeprof.importers.base import (
    DECODE,
    PREFILL,
    WARMUP_IDENTICAL,
    Importer,
    LoadsChunk,
    RoutingChunk,
    bad,
    identical_routing,
    MIN_IDENTICAL_TOKENS,
)
from moeprof.errors import ImportFormatError, UsageError

# ForwardMode values (IntEnum with auto(), so 1-based), from forward_batch_info.py.
FORWARD_EXTEND, FORWARD_DECODE, FORWARD_MIXED, FORWARD_IDLE = 1, 2, 3, 4
_MODE_NAMES = {1: "EXTEND", 2: "DECODE", 3: "MIXED", 4: "IDLE", 5: "TARGET_VERIFY", 6: "DRAFT_EXTEND_V2",
               7: "PREBUILT", 8: "SPLIT_PREFILL", 9: "DLLM_EXTEND"}


def load_pt(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; clear errors for no torch, unsafe or truncated files."""
    try:
        import torch
    except ImportError:
        raise UsageError(
            f"{path}: reading SGLang .pt dumps needs torch, which is not installed; "
            "pip install torch (the CPU wheel is enough)"
        ) from None
    import pickle
    import zipfile

    # torch.load does not check the zip's CRC-32s: a damaged count tensor would be read as counts.
    try:
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        damaged = None  # not a zip (torch's legacy format has no checksums), or cut off: torch.load says so
    if damaged is not None:
        raise ImportFormatError(f"{path}: {damaged}: CRC-32 differs from the one stored in the file: the dump was "
                                "damaged after it was written (copy it again)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ImportFormatError(
            f"{path}: refusing to load: the file holds objects that only unsafe unpickling can restore "
            "(torch.load weights_only=True refused it), and moeprof never unpickles arbitrary code; "
            "an SGLang recorder dump holds only tensors, lists and numbers"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError):
        raise ImportFormatError(
            f"{path}: not a readable torch file (truncated, or not written by torch.save)"
        ) from None


def _np(x: Any, path: Path, where: str, what: str) -> np.ndarray:
    if hasattr(x, "numpy"):
        return x.detach().cpu().numpy()
    raise bad(path, where, f"{what} is not a tensor")


class SGLangImporter(Importer):
    name = "sglang"
    source = "sglang"
    description = "SGLang expert distribution recorder dump (.pt): stat, stat_approx, per_pass, per_token"

    def __init__(self, options) -> None:
        super().__init__(options)
        self._seen_passes: set[tuple[int, str]] = set()

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        # torch.save's zip format: a zip whose first member is "<archive>/data.pkl" (or .format_version).
        return head[:4] == b"PK\x03\x04" and (b"data.pkl" in head[:200] or b".format_version" in head[:200]
                                              or b"byteorder" in head[:200])

    def read(self, path: Path, progress: Callable[[int], None]) -> Iterator[Any]:
        size = path.stat().st_size
        obj = load_pt(path)
        progress(size // 2)
        if not isinstance(obj, dict):
            raise bad(path, "top level", f"expected the recorder's dict, found {type(obj).__name__}")
        if "logical_count" in obj:
            yield from self._stat(obj, path)
        elif "records" in obj:
            yield from self._detail(obj, path)
        else:
            keys = ", ".join(sorted(map(str, obj)))[:200]
            raise bad(path, "top level", "neither 'logical_count' (stat mode) nor 'records' (per_pass/per_token "
                      f"mode) found; keys: {keys}. Is this an SGLang expert distribution dump?")
        progress(size - size // 2)

    # -- stat / stat_approx ----------------------------------------------------------------------
    def _stat(self, obj: dict[str, Any], path: Path) -> Iterator[LoadsChunk]:
        counts = _np(obj["logical_count"], path, "top level", "'logical_count'")
        if counts.ndim != 3:
            raise bad(path, "'logical_count'", f"expected shape (passes, layers, experts), got {counts.shape}")
        passes, layers, experts = counts.shape
        self.num_experts = self.num_experts or experts
        self.num_layers = self.num_layers or layers
        self.capture["sglang_mode"] = "stat"
        self._stat_missing()
        self.note("window = row of SGLang's logical_count buffer (one forward pass, summed over ranks); "
                  "with a circular buffer rows are in ring order, not time order")
        self.note("moe_layers = layers with any routed token (SGLang counts dense layers as all-zero rows)")
        for i in range(passes):
            yield from self._counts_chunk(counts[i], window=i, path=path, where=f"pass row {i}")

    def _stat_missing(self) -> None:
        reason = "SGLang's stat/per_pass recorder keeps counts per forward pass only"
        for cap in ("per_token", "request_ids", "positions", "token_id", "weights"):
            self.missing[cap] = reason
        self.missing["phase"] = "SGLang's stat/per_pass dumps do not say whether a pass was prefill or decode"

    def _counts_chunk(self, c: np.ndarray, window: int, path: Path, where: str) -> Iterator[LoadsChunk]:
        if c.min(initial=0) < 0:
            raise bad(path, where, f"negative count {int(c.min())}")
        layer, expert = np.nonzero(c)
        if layer.size == 0:
            self.skip("all-zero pass rows (unfilled slots of SGLang's circular buffer)", 1)
            return
        n = layer.size
        table = pa.table(
            {
                "window": pa.array(np.full(n, window, np.int64)),
                # Phase is unknown for these dumps: a null column, not a guess.
                "phase": pa.nulls(n, pa.dictionary(pa.int8(), pa.string())),
                "layer": pa.array(layer.astype(np.int16)),
                "expert": pa.array(expert.astype(np.int16)),
                "count": pa.array(c[layer, expert].astype(np.int64)),
                "request_id": pa.nulls(n, pa.int64()),
                "domain": pa.nulls(n, pa.string()),
            }
        )
        yield LoadsChunk(table=table, where=f"{path}: {where}", warmup=_identical_counts(c))

    # -- per_pass / per_token --------------------------------------------------------------------
    def _detail(self, obj: dict[str, Any], path: Path) -> Iterator[Any]:
        records = obj["records"]
        if not isinstance(records, list):
            raise bad(path, "'records'", "expected a list of per-pass records")
        p2l = obj.get("last_physical_to_logical_map")
        if p2l is None:
            raise bad(path, "top level", "'last_physical_to_logical_map' is missing; "
                      "physical expert ids cannot be mapped back to logical ones")
        p2l = _np(p2l, path, "top level", "'last_physical_to_logical_map'").astype(np.int64)
        if p2l.ndim != 2:
            raise bad(path, "'last_physical_to_logical_map'", f"expected (layers, physical experts), got {p2l.shape}")
        n_logical = int(p2l.max()) + 1 if p2l.size else 0
        self.num_layers = self.num_layers or p2l.shape[0]
        if not self.options.num_experts and not self.num_experts:
            self.num_experts = n_logical
            self.note(f"num_experts = {n_logical}: the largest logical id in last_physical_to_logical_map + 1")
        self.note("physical expert ids mapped to logical with the dump's last_physical_to_logical_map "
                  "(if EPLB rebalanced while recording, earlier passes used another map)")
        for i, rec in enumerate(records, start=1):
            where = f"record {i}"
            if not isinstance(rec, dict) or "forward_pass_id" not in rec:
                raise bad(path, where, "expected a dict with 'forward_pass_id'")
            if "topk_ids_of_layer" in rec:
                self.capture["sglang_mode"] = "per_token"
                yield from self._per_token(rec, p2l, path, where)
            elif "global_physical_count" in rec:
                self.capture["sglang_mode"] = "per_pass"
                yield from self._per_pass(rec, p2l, n_logical, path, where)
            else:
                raise bad(path, where, "has neither 'topk_ids_of_layer' (per_token) nor "
                          "'global_physical_count' (per_pass)")
        if self.capture.get("sglang_mode") == "per_pass":
            self._stat_missing()
        elif self.capture.get("sglang_mode") == "per_token":
            self.missing["weights"] = "SGLang's recorder keeps top-k ids, not routing weights"
            self.missing["request_ids"] = (
                "SGLang's recorder does not dump request ids (rids is commented out in "
                "_DetailSinglePassGatherer.on_forward_pass_start): a request here is one sequence of one "
                "forward pass, so decode tokens cannot be joined to their prefill"
            )
            self.note("per_token: step is 0 for prefill rows and 1 for decode rows (each decode token is its own "
                      "pseudo-request); batch_id = forward_pass_id")

    def _per_pass(self, rec, p2l, n_logical, path, where) -> Iterator[LoadsChunk]:
        phys = _np(rec["global_physical_count"], path, where, "'global_physical_count'").astype(np.int64)
        if phys.shape != p2l.shape:
            raise bad(path, where, f"global_physical_count has shape {phys.shape}, the map {p2l.shape}")
        logical = np.zeros((phys.shape[0], n_logical), dtype=np.int64)
        for lay in range(phys.shape[0]):
            np.add.at(logical[lay], p2l[lay], phys[lay])
        fid = int(rec["forward_pass_id"])
        if self._duplicate(fid, logical.tobytes()):
            self.skip("forward passes recorded twice (same pass in another rank's dump)", 1)
            return
        yield from self._counts_chunk(logical, window=fid, path=path, where=where)

    def _duplicate(self, fid: int, payload: bytes) -> bool:
        key = (fid, hashlib.sha1(payload).hexdigest())
        if key in self._seen_passes:
            return True
        self._seen_passes.add(key)
        return False

    def _per_token(self, rec, p2l, path, where) -> Iterator[RoutingChunk]:
        topk = _np(rec["topk_ids_of_layer"], path, where, "'topk_ids_of_layer'").astype(np.int64)
        if topk.ndim != 3:
            raise bad(path, where, f"topk_ids_of_layer: expected (layers, tokens, 8), got {topk.shape}")
        n_layers, n_tok, width = topk.shape
        mode = int(rec.get("forward_mode", 0))
        input_ids = list(rec.get("input_ids") or [])
        positions = rec.get("positions")
        if len(input_ids) != n_tok:
            raise bad(path, where, f"{len(input_ids)} input_ids but topk_ids_of_layer holds {n_tok} tokens")
        if mode == FORWARD_IDLE or n_tok == 0:
            return
        if mode not in (FORWARD_EXTEND, FORWARD_DECODE):
            name = _MODE_NAMES.get(mode, str(mode))
            self.skip(f"forward_mode {name} passes (prefill and decode tokens cannot be told apart, "
                      "or speculative/verify passes)", n_tok * n_layers)
            return
        if n_layers != p2l.shape[0]:
            raise bad(path, where, f"topk_ids_of_layer has {n_layers} layers, the map {p2l.shape[0]}")
        fid = int(rec["forward_pass_id"])
        if self._duplicate(fid, np.asarray(input_ids, np.int64).tobytes() + topk.tobytes()):
            self.skip("forward passes recorded twice (same pass in another rank's dump)", n_tok * n_layers)
            return
        valid = topk >= 0
        moe = valid.any(axis=(1, 2))
        if not moe.any():
            return
        cols = valid[moe].any(axis=(0, 1))
        k = int(cols.sum())
        if not cols[:k].all():
            raise bad(path, where, "inconsistent top-k: -1 padding between expert ids")
        ids = topk[:, :, :k]
        real = valid[:, :, :k]
        # A token is padding (CUDA-graph padding, -1 masked) when all its k ids are -1.
        any_id = real.any(axis=2)
        if (any_id & ~real.all(axis=2)).any():
            lay, tok = np.argwhere(any_id & ~real.all(axis=2))[0]
            raise bad(path, where, f"inconsistent top-k: token {tok} of layer {lay} has "
                      f"{int(real[lay, tok].sum())} expert ids, others {k}")
        pad = int((~any_id[moe]).sum())
        if pad:
            self.skip("-1 padded token slots (no expert selected)", pad)
        if np.any(ids[real] >= p2l.shape[1]):
            bad_id = int(ids[real].max())
            raise bad(path, where, f"physical expert id {bad_id} is out of range for the map's "
                      f"{p2l.shape[1]} physical experts")
        lay_idx, tok_idx = np.nonzero(any_id & moe[:, None])
        phys = ids[lay_idx, tok_idx]
        logical = p2l[lay_idx[:, None], phys]
        limit = self.options.num_experts
        if limit and logical.size and logical.max() >= limit:
            raise bad(path, where, f"expert id {int(logical.max())} is out of range for {limit} experts "
                      f"(ids run 0..{limit - 1}); check --num-experts")
        if positions is not None:
            pos_all = np.asarray(list(positions), dtype=np.int64)
            if pos_all.shape != (n_tok,):
                raise bad(path, where, f"{pos_all.size} positions for {n_tok} tokens")
        else:
            self.missing["positions"] = "the dump has no 'positions'"
            pos_all = np.arange(n_tok)
        seq = self._sequences(rec, mode, n_tok, path, where)
        tok_ids = np.asarray(input_ids, dtype=np.int64)
        rank = int(rec.get("rank", 0))
        phase = PREFILL if mode == FORWARD_EXTEND else DECODE
        chunk = RoutingChunk(
            request_key=[(rank, fid, int(s)) for s in seq[tok_idx]],
            step=np.full(tok_idx.size, 0 if phase == PREFILL else 1, np.int32),
            phase=np.full(tok_idx.size, phase, np.int8),
            pos=pos_all[tok_idx].astype(np.int32),
            layer=lay_idx,
            experts=logical,
            where=f"{path}: {where} (forward_pass_id {fid})",
            batch_id=np.full(tok_idx.size, fid, np.int64),
            token_id=tok_ids[tok_idx],
        )
        if n_tok >= MIN_IDENTICAL_TOKENS and len(set(input_ids)) == 1 and identical_routing(
            chunk.layer, chunk.experts
        ):
            chunk.warmup = WARMUP_IDENTICAL
        yield chunk

    def _sequences(self, rec, mode, n_tok, path, where) -> np.ndarray:
        """Sequence index of each token: extend_seq_lens splits an EXTEND pass; a DECODE token is its own."""
        if mode == FORWARD_DECODE:
            return np.arange(n_tok)
        lens = rec.get("extend_seq_lens")
        if lens is None:
            return np.zeros(n_tok, dtype=np.int64)
        lens = [int(x) for x in lens]
        if sum(lens) != n_tok:
            raise bad(path, where, f"extend_seq_lens sum to {sum(lens)}, the pass has {n_tok} tokens")
        return np.repeat(np.arange(len(lens)), lens)


def _identical_counts(c: np.ndarray) -> str | None:
    """Warm-up test for counts (layers, experts): every used layer has the same few experts, equally loaded."""
    used = c.sum(axis=1) > 0
    if not used.any():
        return None
    nz = [np.flatnonzero(row) for row in c[used]]
    k = nz[0].size
    for row, idx in zip(c[used], nz):
        vals = row[idx]
        if idx.size != k or not (vals == vals[0]).all() or vals[0] < MIN_IDENTICAL_TOKENS:
            return None
    return WARMUP_IDENTICAL
