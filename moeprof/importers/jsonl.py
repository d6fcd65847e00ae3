"""Per-token routing JSONL: the log people write from vLLM/SGLang hooks, and moeprof's own export.

One JSON object per line and per (request, token, MoE layer)::

    {"req_id": "r1", "token_idx": 0, "layer": 3, "topk_ids": [5, 1], "topk_weights": [0.7, 0.3]}

This is the shape of hook loggers placed right after ``FusedMoE.select_experts`` in vLLM's
``vllm/model_executor/layers/fused_moe/layer.py`` (e.g. github.com/weiran0129/vLLM-MoE-Logger,
README.md: ``{layer, token_idx, topk_ids, topk_weights}`` per token), where ``topk_ids`` and
``topk_weights`` are the two tensors the router returns. Optional fields: ``phase``
(``prefill``/``decode``), ``step``, ``batch_id``, ``token_id``. An optional first line without the
token fields carries model info (``{"meta": {"model": {...}}}`` as :func:`export_jsonl` writes, or
flat ``model``/``model_name``, ``num_experts``, ``top_k``, ``num_layers`` keys). Field names are
configurable (``--field topk_ids=experts``).

Streaming: the file is read in blocks of lines and handed on in chunks of ``chunk_rows`` rows. A
block is parsed and checked column-wise by pyarrow's JSON reader (the fast path); a block it cannot
take whole (a bad line, a blank line, a field of another type) is read again line by line, which
names the line. Warm-up is judged per forward pass inside a request's consecutive lines (a pass ends
where ``token_idx`` restarts; see :mod:`moeprof.importers.warmup`), so dummy passes logged under a
real request id (vLLM-MoE-Logger files everything under ``r1``) are found too.
"""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from moeprof.importers.base import (
    DECODE,
    PREFILL,
    WARMUP_NO_REQUEST,
    Importer,
    RoutingChunk,
    bad,
    not_utf8,
    phase_code,
    read_prompt_lens,
)
from moeprof.importers.warmup import WarmupDetector, pass_starts, split_passes
from moeprof.errors import UsageError

try:  # orjson parses ~3x faster when present; the stdlib is the fallback
    from orjson import loads as _json_loads
except ImportError:  # pragma: no cover - depends on the environment
    _json_loads = json.loads

FIELDS = ("req_id", "token_idx", "layer", "topk_ids", "topk_weights", "phase", "step", "batch_id", "token_id")
REQUIRED = ("req_id", "token_idx", "layer", "topk_ids")
META_MARK = "meta"
FORMAT_NAME = "moeprof-routing-jsonl"
FAST_BLOCK_BYTES = 4 << 20
"""Bytes of lines parsed at once by the fast path (a block's rows are held as arrays). Small enough that a
file of a few blocks is parsed mostly ahead, on the second thread (16 MiB parsed a 17 MiB file's first
block alone, 0.2 s before anything else could start)."""
_INT32 = (-(1 << 31), (1 << 31) - 1)
# a blank line: the first, or one after a newline (a pattern that starts with "\n" is scanned fast)
_BLANK_FIRST = re.compile(rb"[ \t\r]*(?:\n|\Z)")
_BLANK_LINE = re.compile(rb"\n[ \t\r]*(?:\n|\Z)")


def parse_field_map(specs: list[str] | None) -> dict[str, str]:
    """``["topk_ids=experts", ...]`` -> ``{"topk_ids": "experts"}`` (canonical name -> name in the file)."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, alias = spec.partition("=")
        name, alias = name.strip(), alias.strip()
        if not sep or not alias:
            raise UsageError(f"--field {spec!r}: expected CANONICAL=NAME, e.g. topk_ids=experts")
        if name not in FIELDS:
            raise UsageError(f"--field {spec!r}: unknown field {name!r}; known: {', '.join(FIELDS)}")
        out[name] = alias
    return out


def _is_meta(obj: dict[str, Any], names: dict[str, str]) -> bool:
    return META_MARK in obj or not any(names[f] in obj for f in ("req_id", "layer", "topk_ids"))


class JsonlImporter(Importer):
    name = "jsonl"
    source = "jsonl"
    description = "per-token JSONL (req_id, token_idx, layer, topk_ids[, topk_weights]) from engine hooks"

    def __init__(self, options) -> None:
        super().__init__(options)
        self.names = {f: options.fields.get(f, f) for f in FIELDS}
        self._prompt_lens: dict[str, int] | None = None
        self._phase_field: str | None = None
        spec = options.phase_from or "auto"
        if spec.startswith("prompt-len:"):
            self._prompt_lens = read_prompt_lens(Path(spec.split(":", 1)[1]))
        elif spec.startswith("field:"):
            self._phase_field = spec.split(":", 1)[1]
        elif spec not in ("auto", "none"):
            raise UsageError(
                f"--phase-from {spec!r}: expected auto, none, field:NAME or prompt-len:FILE.csv"
            )
        self._phase_spec = spec
        self._phase_reason: str | None = None
        self._k: int | None = None
        self._k_line = 0
        self._k_path: Path | None = None  # the file of the line that set the top-k
        self._declared: dict[str, str] = {}
        self._seen_real_request = False
        self._prefill_len: dict[Any, int] = {}
        self._has: dict[str, bool] = {}
        self._warmup = WarmupDetector()
        self._pass_last: dict[int, int] = {}

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        lines = _json_lines(head, 2)
        if not lines or not isinstance(lines[0], dict):
            return False
        first = lines[0]
        if META_MARK in first and isinstance(first[META_MARK], dict):
            return first[META_MARK].get("format") == FORMAT_NAME or "model" in first[META_MARK]
        if "topk_ids" not in first and len(lines) > 1 and isinstance(lines[1], dict):
            first = lines[1]  # a flat meta line first
        return "topk_ids" in first and ("req_id" in first or "token_idx" in first)

    # -- reading ---------------------------------------------------------------------------------
    def read(self, path: Path, progress: Callable[[int], None]) -> Iterator[RoutingChunk]:
        self._buf = _Buffer()
        self._unit: Any = object()
        self._data_seen = False
        self._warmup, self._pass_last = WarmupDetector(), {}  # each file warms up on its own
        self._schema: pa.Schema | None | bool = None  # False: no fast path for this file
        self._key_seen: Any = None
        self._parsed: tuple[bytes, Any] | None = None
        lineno = 0
        # The next block is parsed on a thread of its own while this one is checked and handed on
        # (pyarrow parses without the GIL): parsing is about two thirds of the fast path's work.
        with open(path, "rb") as fh, ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeprof-json") as pool:
            blocks = _line_blocks(fh, FAST_BLOCK_BYTES)
            nxt, ahead = next(blocks, None), None
            while nxt is not None:
                block, nxt = nxt, next(blocks, None)
                self._parsed, ahead = ahead, None  # this block, if its parse was started with the last
                progress(len(block))
                n = block.count(b"\n") + (not block.endswith(b"\n"))
                start, offset = 0, 0
                # Line by line until the first routing line: meta lines, and the top-k, the type of
                # request ids and which optional fields the log has, which the fast path then checks.
                while start < n and not self._data_seen:
                    end = block.find(b"\n", offset)
                    end = len(block) if end < 0 else end
                    yield from self._line(block[offset:end], path, lineno + start + 1)
                    start, offset = start + 1, end + 1
                if start < n:
                    if self._schema is None:
                        self._schema = self._fast_schema()
                    if nxt is not None and isinstance(self._schema, pa.Schema):
                        ahead = (nxt, pool.submit(self._parse, nxt))
                    rest = block[offset:] if offset else block
                    done = yield from self._fast(rest, n - start, path, lineno + start)
                    if not done:
                        for i, raw in enumerate(rest.split(b"\n")[: n - start], start=lineno + start + 1):
                            yield from self._line(raw, path, i)
                lineno += n
        yield from self._flush(self._buf, path, self._unit)
        self._finish_missing()

    def _line(self, raw: bytes, path: Path, lineno: int) -> Iterator[RoutingChunk]:
        """One line, read as Python objects: every check with the line's number in its message."""
        obj = _parse_line(raw, path, lineno, "JSONL routing log")
        if obj is None:
            return
        names, buf = self.names, self._buf
        if buf.first_line is None and self._meta_allowed(lineno, buf) and _is_meta(obj, names):
            self._read_meta(obj, path, lineno)
            return
        for f in REQUIRED:
            if names[f] not in obj:
                raise bad(path, f"line {lineno}", f"field {names[f]!r} is missing"
                          + (f" (use --field {f}=NAME if it has another name)" if names[f] == f else ""))
        key = obj[names["req_id"]]
        if isinstance(key, float) and key.is_integer():
            key = int(key)
        if key != self._unit or buf.rows >= self.options.chunk_rows:
            yield from self._flush(buf, path, self._unit)
            if key != self._unit:
                self._pass_last.clear()
            self._unit = key
        if not self._data_seen:
            self._first_row = obj
        if self._key_seen is None:
            self._key_seen = key
        self._add(buf, obj, key, path, lineno)

    # -- the fast path: a block of lines as columns ------------------------------------------------
    def _fast(self, data: bytes, n: int, path: Path, line0: int) -> Iterator[RoutingChunk]:
        """Read ``n`` lines (after line ``line0``) as one table; False, having changed nothing, when
        any line needs reading one by one (to be checked, and named if it is wrong)."""
        if self._schema is None:
            self._schema = self._fast_schema()
        if not self._schema:  # None: no request id seen yet to type the column; False: never
            return False
        end = len(data) - data.endswith(b"\n")
        if _BLANK_FIRST.match(data, 0, end) or _BLANK_LINE.search(data, 0, end):  # rows would no longer follow lines
            return False
        ahead, self._parsed = self._parsed, None
        try:
            table = ahead[1].result() if ahead is not None and ahead[0] is data else self._parse(data)
        except (pa.ArrowException, ValueError):
            return False
        if table.num_rows != n:  # blank lines: the line numbers would not follow the rows
            return False
        try:
            cols = self._fast_columns(table, data, n)
        except pa.ArrowException:  # e.g. a string that is not UTF-8, which read_json does not check
            return False
        if cols is None:
            return False
        yield from self._fast_units(cols, n, path, line0)
        return True

    def _parse(self, data: bytes) -> pa.Table:
        return pa_json.read_json(io.BytesIO(data), parse_options=pa_json.ParseOptions(
            explicit_schema=self._schema, unexpected_field_behavior="ignore"))

    def _fast_schema(self) -> pa.Schema | None | bool:
        """Column types the routing lines must have, from the first with a request id; None: not
        known yet; False: no fast path for this file."""
        names, row = self.names, self._first_row
        key = self._key_seen
        if key is None:
            return None
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            return False
        phase_name = self._phase_field or names["phase"]
        if row.get(phase_name) is not None and not isinstance(row.get(phase_name), str):
            return False
        fields = [(names["req_id"], pa.int64() if isinstance(key, int) else pa.string())]
        fields += [(names[f], pa.int64()) for f in ("token_idx", "layer", "step", "batch_id", "token_id")]
        fields += [(names["topk_ids"], pa.list_(pa.int64())), (names["topk_weights"], pa.list_(pa.float64())),
                   (phase_name, pa.string())]
        if len({f for f, _ in fields}) != len(fields):
            return False
        return pa.schema(fields)

    def _fast_columns(self, table: pa.Table, data: bytes, n: int) -> dict[str, Any] | None:
        """Every check of :meth:`_add` and :meth:`_phase_step`, column-wise; None where a line fails
        one (the line-by-line reader then names it) or where the columns cannot tell."""
        names = self.names

        def col(name: str) -> pa.Array:
            return table.column(name).combine_chunks()

        def whole(name: str) -> np.ndarray | None:  # a value on every line, or None
            c = col(name)
            return None if c.null_count else c.to_numpy(zero_copy_only=False)

        def optional(name: str) -> tuple[bool, np.ndarray | None] | None:  # (present, values), None if mixed
            c = col(name)
            if c.null_count == 0:
                return True, c
            return (False, None) if c.null_count == n else None

        keys, pos, layer = whole(names["req_id"]), whole(names["token_idx"]), whole(names["layer"])
        ids = col(names["topk_ids"])
        k = self._k
        if keys is None or pos is None or layer is None or ids.null_count or not k:
            return None
        flat = _values(ids)
        if (np.diff(ids.offsets.to_numpy()) != k).any() or flat.null_count:
            return None
        experts = flat.to_numpy().reshape(n, k)
        limit = self.options.num_experts or self.num_experts
        if limit and (experts.min() < 0 or experts.max() >= limit):
            return None
        if pos.min() < _INT32[0] or pos.max() > _INT32[1]:
            return None
        out: dict[str, Any] = dict(layer=layer, experts=experts)
        for canon, field in (("weights", "topk_weights"), ("batch_id", "batch_id"), ("token_id", "token_id")):
            got = optional(names[field])
            if got is None or got[0] != self._has.get(canon):
                return None
            if not got[0]:
                continue
            c = got[1]
            if canon == "weights":
                flat = _values(c)
                if (np.diff(c.offsets.to_numpy()) != k).any() or flat.null_count:
                    return None
                weights = flat.to_numpy()
                if not np.isfinite(weights).all():  # pyarrow reads NaN / Infinity, which JSON has not
                    return None
                out["weights"] = weights.astype(np.float32).reshape(n, k)
            else:
                out[canon] = c.to_numpy()
        step_got = optional(names["step"])
        if step_got is None:
            return None
        step = step_got[1].to_numpy() if step_got[0] else None
        phase: np.ndarray | None = None
        presence = True  # the line-by-line reader records whether the phase is known
        if self._phase_spec == "none":
            pass
        elif self._phase_field is not None:
            phase = _phase_codes(col(self._phase_field))
            if phase is None:
                return None
        elif self._prompt_lens is not None:
            uniq, inv = np.unique(keys, return_inverse=True)
            plens = [self._prompt_lens.get(str(u)) for u in uniq.tolist()]
            if any(p is None for p in plens):
                return None
            plen = np.asarray(plens, np.int64)[inv.reshape(-1)]
            phase = np.where(pos < plen, PREFILL, DECODE).astype(np.int8)
            if step is None:
                step, presence = np.where(phase == PREFILL, 0, pos - plen + 1), False
        else:
            c = col(names["phase"])
            if c.null_count == 0:
                phase = _phase_codes(c)
                if phase is None:
                    return None
            elif c.null_count != n or f'"{names["phase"]}"'.encode() in data:
                return None  # a line with "phase": null, which the line-by-line reader rejects
            elif step is not None:
                phase = np.where(step == 0, PREFILL, DECODE).astype(np.int8)
        prefill_len: dict[Any, int] = {}
        orphans = False
        if phase is None:
            phase = np.full(n, PREFILL, np.int8)
            step = step if step is not None else np.zeros(n, np.int64)
            known = False
        else:
            known = True
            if step is None:
                step, prefill_len, orphans = self._decode_steps(keys, pos, phase)
                if step is None:
                    return None
        if step.min() < _INT32[0] or step.max() > _INT32[1]:
            return None
        real = (keys >= 0) if keys.dtype.kind in "iu" else (keys != "")
        out.update(keys=keys, pos=pos.astype(np.int32), phase=phase.astype(np.int8), step=step.astype(np.int32))
        out["_state"] = (presence and bool(real.any()), known, prefill_len, orphans)
        return out

    def _decode_steps(self, keys: np.ndarray, pos: np.ndarray, phase: np.ndarray):
        """Steps where only the phase is known: 0 in prefill, position - prompt length + 1 in decode,
        the prompt length being what the request's prefill lines so far (this block's included) show."""
        prefill = phase == PREFILL
        if prefill.any() and pos[prefill].min() < 0:
            return None, {}, False
        uniq, inv = np.unique(keys, return_inverse=True)
        inv = inv.reshape(-1)
        known = np.array([self._prefill_len.get(u, 0) for u in uniq.tolist()], np.int64)
        v = np.where(prefill, pos + 1, 0).astype(np.int64)
        # running max per request in line order: requests sorted apart, each lifted above the last
        order = np.argsort(inv, kind="stable")
        lift = inv[order].astype(np.int64) * (int(v.max()) + 1)
        so_far = np.empty(v.size, np.int64)
        so_far[order] = np.maximum.accumulate(v[order] + lift) - lift
        plen = np.maximum(known[inv], so_far)
        decode = ~prefill
        step = np.where(decode, pos - plen + 1, 0)
        best = np.zeros(uniq.size, np.int64)
        np.maximum.at(best, inv, v)
        update = {u: max(int(b), int(kn)) for u, b, kn, has in zip(uniq.tolist(), best.tolist(), known.tolist(),
                                                                   np.bincount(inv, prefill, uniq.size).tolist())
                  if has}
        return step, update, bool((decode & (plen == 0)).any())

    def _fast_units(self, cols: dict[str, Any], n: int, path: Path, line0: int) -> Iterator[RoutingChunk]:
        """Record what the block showed, then split its rows into units as the line-by-line reader does."""
        presence, known, prefill_len, orphans = cols.pop("_state")
        if presence:
            self._presence_phase(known)
        self._prefill_len.update(prefill_len)
        if orphans:
            self.note("decode rows of a request with no prefill rows: their step counts from position 0")
        keys = cols.pop("keys")
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        ends = np.r_[starts[1:], n]
        buf, limit = self._buf, self.options.chunk_rows
        for s, e, key in zip(starts.tolist(), ends.tolist(), keys[starts].tolist()):
            i = s
            while i < e:
                if key != self._unit or buf.rows >= limit:
                    yield from self._flush(buf, path, self._unit)
                    if key != self._unit:
                        self._pass_last.clear()
                    self._unit = key
                take = min(e - i, limit - buf.rows)
                piece = {name: values[i : i + take] for name, values in cols.items()}
                piece["keys"] = np.full(take, key, np.int64) if isinstance(key, int) else [key] * take
                buf.add_piece(piece, take, line0 + 1 + i, line0 + i + take)
                i += take

    def _meta_allowed(self, lineno: int, buf: "_Buffer") -> bool:
        return not self._data_seen

    def _read_meta(self, obj: dict[str, Any], path: Path, lineno: int) -> None:
        meta = obj.get(META_MARK, obj)
        if not isinstance(meta, dict):
            raise bad(path, f"line {lineno}", "the meta line's 'meta' must be a JSON object")
        model = meta.get("model") if isinstance(meta.get("model"), dict) else meta
        name = model.get("name") if isinstance(meta.get("model"), dict) else (meta.get("model_name") or meta.get("model"))
        if isinstance(name, str):
            self.model_name = name
        for attr in ("num_experts", "top_k", "num_layers"):
            v = model.get(attr)
            if isinstance(v, int) and v > 0:
                setattr(self, attr, v)
        declared = meta.get("missing")
        if isinstance(declared, dict):
            # What the exported trace lacked stays lacking, with its original reason (request ids of
            # SGLang pseudo-requests, Megatron's index-in-record positions, an unknown phase whose
            # ``step`` was still written, ...).
            self._declared.update({str(k): str(v) for k, v in declared.items()})
            if "phase" in declared:
                self._phase_spec = "none"
                self._phase_reason = str(declared["phase"])
        doms = meta.get("domains")
        if isinstance(doms, dict):
            self.domains.update({str(k): str(v) for k, v in doms.items()})
        for note in meta.get("notes", []) if isinstance(meta.get("notes"), list) else []:
            self.note(f"source: {note}")

    def _add(self, buf: "_Buffer", obj: dict[str, Any], key: Any, path: Path, lineno: int) -> None:
        names = self.names
        where = f"line {lineno}"
        ids = obj[names["topk_ids"]]
        if not isinstance(ids, list) or not ids or not all(isinstance(x, int) for x in ids):
            raise bad(path, where, f"{names['topk_ids']!r} must be a non-empty list of integer expert ids")
        try:
            pos = int(obj[names["token_idx"]])
            layer = int(obj[names["layer"]])
        except (TypeError, ValueError):
            raise bad(path, where, f"{names['token_idx']!r} and {names['layer']!r} must be integers") from None
        if self._k is None:
            self._k, self._k_line, self._k_path = len(ids), lineno, path
        elif len(ids) != self._k:
            there = f"line {self._k_line}" if self._k_path == path else f"{self._k_path} line {self._k_line}"
            raise bad(path, where, f"inconsistent top-k: {len(ids)} expert ids here, {self._k} on {there}")
        limit = self.options.num_experts or self.num_experts
        if limit and (max(ids) >= limit or min(ids) < 0):
            e = max(ids) if max(ids) >= limit else min(ids)
            raise bad(path, where, f"expert id {e} is out of range for {limit} experts (ids run 0..{limit - 1}); "
                      "check --num-experts")
        weights = obj.get(names["topk_weights"])
        self._presence(buf, "weights", weights is not None, path, where)
        if weights is not None:
            if not isinstance(weights, list) or len(weights) != len(ids):
                raise bad(path, where, f"{names['topk_weights']!r} must list {len(ids)} numbers, one per expert id")
            buf.weights.append(weights)
        for col in ("batch_id", "token_id"):
            v = obj.get(names[col])
            self._presence(buf, col, v is not None, path, where)
            if v is not None:
                getattr(buf, col).append(int(v))
        phase, step = self._phase_step(obj, key, pos, path, where)
        if buf.first_line is None:
            buf.first_line = lineno
        buf.last_line = lineno
        buf.keys.append(key)
        buf.pos.append(pos)
        buf.layer.append(layer)
        buf.experts.append(ids)
        buf.phase.append(phase)
        buf.step.append(step)
        self._data_seen = True

    def _presence(self, buf: "_Buffer", col: str, present: bool, path: Path, where: str) -> None:
        seen = self._has.get(col)
        if seen is None:
            self._has[col] = present
        elif seen != present:
            field = self.names["topk_weights" if col == "weights" else col]
            raise bad(path, where, f"field {field!r} is {'present' if present else 'missing'} here but "
                      f"{'missing' if present else 'present'} on earlier lines; every line must have it or none")

    def _phase_step(self, obj: dict[str, Any], key: Any, pos: int, path: Path, where: str) -> tuple[int, int]:
        names = self.names
        step_v = obj.get(names["step"])
        phase: int | None = None
        if self._phase_spec == "none":
            phase = None
        elif self._phase_field is not None:
            if self._phase_field not in obj:
                raise bad(path, where, f"--phase-from field:{self._phase_field}: the field is missing")
            phase = phase_code(obj[self._phase_field])
            if phase is None:
                raise bad(path, where, f"phase value {obj[self._phase_field]!r} is neither prefill nor decode")
        elif self._prompt_lens is not None:
            plen = self._prompt_lens.get(str(key))
            if plen is None:
                raise bad(path, where, f"request {key!r} is not in the --phase-from prompt-length file")
            phase = PREFILL if pos < plen else DECODE
            if step_v is None:
                return phase, 0 if phase == PREFILL else pos - plen + 1
        elif names["phase"] in obj:
            phase = phase_code(obj[names["phase"]])
            if phase is None:
                raise bad(path, where, f"phase value {obj[names['phase']]!r} is neither prefill nor decode")
        elif step_v is not None:
            phase = PREFILL if int(step_v) == 0 else DECODE
        if key is not None and key != "" and not (isinstance(key, int) and key < 0):
            self._presence_phase(phase is not None)
        if phase is None:
            return PREFILL, int(step_v) if step_v is not None else 0
        if step_v is not None:
            return phase, int(step_v)
        if phase == PREFILL:
            self._prefill_len[key] = max(self._prefill_len.get(key, 0), pos + 1)
            return phase, 0
        plen = self._prefill_len.get(key)
        if plen is None:
            self.note("decode rows of a request with no prefill rows: their step counts from position 0")
            plen = 0
        return phase, pos - plen + 1

    def _presence_phase(self, known: bool) -> None:
        self._has["phase_known"] = self._has.get("phase_known", True) and known

    def _flush(self, buf: "_Buffer", path: Path, key: Any) -> Iterator[RoutingChunk]:
        if buf.rows == 0:
            return
        where = f"lines {buf.first_line}-{buf.last_line}"
        cols = buf.arrays()
        layer, experts, token_id = cols["layer"], cols["experts"], cols.get("token_id")
        keys, pos, weights = cols["keys"], cols["pos"], cols.get("weights")
        runs: list[tuple[slice, str | None]] = [(slice(0, buf.rows), None)]
        real = key is not None and not (isinstance(key, int) and key < 0) and key != ""
        if not real and "request_ids" in self._declared:
            keys = [None] * buf.rows  # the exported trace never had request ids: not warm-up
        elif not real:
            if self._seen_real_request:
                self.skip("rows without a request id after the first real request", buf.rows)
                buf.clear()
                return
            runs = [(slice(0, buf.rows), WARMUP_NO_REQUEST)]
            keys = [None] * buf.rows
        else:
            self._seen_real_request = True
            runs = split_passes(dict(layer=layer, experts=experts, weights=weights, token_id=token_id),
                                pass_starts(pos, layer, self._pass_last), self._warmup)
        step, phase, batch_id = cols["step"], cols["phase"], cols.get("batch_id")
        buf.clear()
        for sl, warm in runs:
            yield RoutingChunk(
                request_key=keys[sl],
                step=step[sl],
                phase=phase[sl],
                pos=pos[sl],
                layer=layer[sl],
                experts=experts[sl],
                where=f"{path}: {where}",
                weights=None if weights is None else weights[sl],
                batch_id=None if batch_id is None else batch_id[sl],
                token_id=None if token_id is None else token_id[sl],
                warmup=warm,
            )

    def _finish_missing(self) -> None:
        if not self._has.get("weights"):
            self.missing["weights"] = f"the log has no {self.names['topk_weights']!r} field"
        if not self._has.get("batch_id"):
            self.missing["batch_id"] = f"the log has no {self.names['batch_id']!r} field"
        if not self._has.get("token_id"):
            self.missing["token_id"] = f"the log has no {self.names['token_id']!r} field"
        self.missing.update(self._declared)
        if self._phase_reason:
            self.missing["phase"] = self._phase_reason
        elif not self._has.get("phase_known", True) or self._phase_spec == "none":
            self.missing["phase"] = (
                f"the log has no {self.names['phase']!r} or {self.names['step']!r} field "
                "(use --phase-from field:NAME or prompt-len:FILE.csv if you know it)"
            )


class _Buffer:
    """Rows of the unit being gathered: Python lists from lines read one by one, array pieces
    from blocks read by the fast path, in file order."""

    LISTS = ("keys", "pos", "layer", "experts", "weights", "phase", "step", "batch_id", "token_id")
    DTYPES = dict(pos=np.int32, layer=np.int64, experts=np.int64, weights=np.float32, phase=np.int8,
                  step=np.int32, batch_id=np.int64, token_id=np.int64)

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.keys: list[Any] = []
        self.pos: list[int] = []
        self.layer: list[int] = []
        self.experts: list[list[int]] = []
        self.weights: list[list[float]] = []
        self.phase: list[int] = []
        self.step: list[int] = []
        self.batch_id: list[int] = []
        self.token_id: list[int] = []
        self.pieces: list[dict[str, Any]] = []
        self.piece_rows = 0
        self.first_line: int | None = None
        self.last_line: int | None = None

    @property
    def rows(self) -> int:
        return len(self.layer) + self.piece_rows

    def _seal(self) -> None:
        """Turn the rows gathered as lists into an array piece (they come before the next piece)."""
        if not self.layer:
            return
        piece: dict[str, Any] = {"keys": self.keys}
        for name, dtype in self.DTYPES.items():
            values = getattr(self, name)
            if values:
                piece[name] = np.asarray(values, dtype=dtype)
        n = len(self.layer)
        first, last = self.first_line, self.last_line
        pieces, piece_rows = self.pieces, self.piece_rows
        self.clear()
        self.pieces, self.piece_rows = pieces + [piece], piece_rows + n
        self.first_line, self.last_line = first, last

    def add_piece(self, piece: dict[str, Any], rows: int, first_line: int, last_line: int) -> None:
        self._seal()
        self.pieces.append(piece)
        self.piece_rows += rows
        if self.first_line is None:
            self.first_line = first_line
        self.last_line = last_line

    def arrays(self) -> dict[str, Any]:
        """Every column of the gathered rows (``keys`` a list or an array; optional columns only if present)."""
        self._seal()
        if len(self.pieces) == 1:
            return self.pieces[0]
        out: dict[str, Any] = {}
        for name in self.LISTS:
            parts = [p[name] for p in self.pieces if name in p]
            if not parts:
                continue
            if name == "keys":
                out[name] = [k for part in parts for k in (part.tolist() if isinstance(part, np.ndarray) else part)]
            else:
                out[name] = np.concatenate(parts)
        return out


def _values(lists: pa.ListArray) -> pa.Array:
    """The items of ``lists`` (no null list), in order: ``ListArray.flatten`` without the import of
    pyarrow.compute it makes (about 30 ms of a 10^4-row import)."""
    start, end = lists.offsets[0].as_py(), lists.offsets[-1].as_py()
    return lists.values.slice(start, end - start)


def _phase_codes(values: pa.Array) -> np.ndarray | None:
    """``(n,)`` int8 phase codes of a string column; None if a value is missing or no phase.

    Read off the column's buffers: each distinct spelling (a few: ``prefill``, ``decode``) is found by
    its bytes, one vectorised comparison each, and mapped once by :func:`phase_code`
    (``dictionary_encode`` would import pyarrow.compute, about 30 ms of a 10^4-row import)."""
    n = len(values)
    if values.null_count or not pa.types.is_string(values.type):
        return None
    offsets = np.frombuffer(values.buffers()[1], np.int32)[values.offset : values.offset + n + 1]
    lengths = np.diff(offsets)
    width = int(lengths.max()) if n else 0
    if width > 64:  # no phase is spelled so long, unless padded with blanks: value by value
        codes = [phase_code(v) for v in values.to_pylist()]
        return None if None in codes else np.asarray(codes, np.int8)
    # Each value as whole 8-byte words: its bytes, zeros, its length last ("a\0" and "a" stay apart)
    words = -(-(width + 1) // 8)
    start, end = int(offsets[0]), int(offsets[-1])
    data = np.zeros(end - start + 8 * words, np.uint8)  # the values' bytes, room to read a whole key past the last
    data[: end - start] = np.frombuffer(values.buffers()[2], np.uint8)[start:end]
    at = np.arange(8 * words)
    keys = np.where(at < lengths[:, None], data[offsets[:-1, None] - start + at], 0).astype(np.uint8)
    keys[:, -1] = lengths
    keys = keys.view(np.uint64)  # (n, words)
    out = np.empty(n, np.int8)
    todo = np.ones(n, bool)
    while todo.any():
        first = int(todo.argmax())
        try:
            code = phase_code(values[first].as_py())
        except UnicodeDecodeError:  # read_json does not check UTF-8: the line-by-line reader names the line
            return None
        if code is None:
            return None
        same = (keys == keys[first]).all(axis=1)
        out[same] = code
        todo &= ~same
    return out


def _short(exc: Exception) -> str:
    return str(exc).split("\n")[0][:120]


def _json_lines(head: bytes, n: int) -> list[Any]:
    """The first ``n`` non-empty lines of ``head`` parsed as JSON (stops at the first that is not)."""
    out: list[Any] = []
    for line in head.split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(_json_loads(line))
        except ValueError:
            break
        if len(out) >= n:
            break
    return out


def _parse_line(raw: bytes, path: Path, lineno: int, what: str) -> dict[str, Any] | None:
    """A line's JSON object (None for a blank line); a bad line names ``path:line``."""
    if not raw.strip():
        return None
    try:
        obj = _json_loads(raw)
    except ValueError:
        encoding = not_utf8(path, lineno, raw, "JSON must be UTF-8: convert the file")
        if encoding is not None:
            raise encoding from None
        raise bad(path, f"line {lineno}", f"not valid JSON (the file is cut off here, or not a {what})") from None
    if not isinstance(obj, dict):
        raise bad(path, f"line {lineno}", "expected a JSON object per line")
    return obj


def json_records(path: Path, progress: Callable[[int], None], what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank line of a JSONL file; a bad line names ``path:line``."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            progress(len(raw))
            obj = _parse_line(raw, path, lineno, what)
            if obj is not None:
                yield lineno, obj


def _line_blocks(fh: Any, size: int) -> Iterator[bytes]:
    """The file in blocks of about ``size`` bytes, each ending at the end of a line."""
    while True:
        block = fh.read(size)
        if not block:
            return
        if not block.endswith(b"\n"):
            block += fh.readline()
        yield block


def _first_json_line(head: bytes) -> Any:
    lines = _json_lines(head, 1)
    return lines[0] if lines else None


# -- export ----------------------------------------------------------------------------------------
def export_jsonl(trace: Any, path: str | Path) -> int:
    """Write a trace's routing rows as per-token JSONL that :class:`JsonlImporter` reads back.

    ``trace`` is a :class:`moeprof.trace.reader.Trace` (or a path to one). The first line is a meta
    line with the model, the source's ``missing`` capabilities and the request domains; then one
    line per routing row, shard by shard (memory bounded). Columns the trace lacks (``missing``) are
    left out of the lines, so that importing the file again restores the same ``missing``.
    Returns the number of routing rows written.
    """
    from moeprof.trace.reader import Trace

    if not isinstance(trace, Trace):
        trace = Trace.open(trace)
    man = trace.manifest
    requests = trace.requests()
    domains = {str(r): d for r, d in zip(requests["request_id"].to_list(), requests["domain"].to_list())}
    meta = {
        META_MARK: {
            "format": FORMAT_NAME,
            "version": 1,
            "model": man.model.to_dict(),
            "source": man.source,
            "missing": man.missing,
            "domains": domains,
        }
    }
    keep_weights = man.has("weights")
    keep_batch = man.has("batch_id")
    keep_token = man.has("token_id")
    keep_phase = man.has("phase")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    rows = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(meta) + "\n")
        for batch in trace.routing_batches():
            cols = batch.to_pydict()
            phases = [str(p) for p in cols["phase"]]
            for i in range(batch.num_rows):
                rec: dict[str, Any] = {
                    "req_id": cols["request_id"][i],
                    "token_idx": cols["pos"][i],
                    "layer": cols["layer"][i],
                    "topk_ids": cols["experts"][i],
                }
                if keep_weights and cols["weights"][i] is not None:
                    rec["topk_weights"] = cols["weights"][i]
                if keep_phase:
                    rec["phase"] = phases[i]
                rec["step"] = cols["step"][i]
                if keep_batch and cols["batch_id"][i] is not None:
                    rec["batch_id"] = cols["batch_id"][i]
                if keep_token and cols["token_id"][i] is not None:
                    rec["token_id"] = cols["token_id"][i]
                fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
            rows += batch.num_rows
    tmp.replace(path)
    return rows
