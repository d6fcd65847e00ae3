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

Streaming: lines are parsed one at a time and handed on in chunks of ``chunk_rows`` rows. Warm-up
is judged per forward pass inside a request's consecutive lines (a pass ends where ``token_idx``
restarts; see :mod:`moeprof.importers.warmup`), so dummy passes logged under a real request id
(vLLM-MoE-Logger files everything under ``r1``) are found too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from moeprof.importers.base import (
    DECODE,
    PREFILL,
    WARMUP_NO_REQUEST,
    Importer,
    RoutingChunk,
    bad,
    phase_code,
    read_prompt_lens,
)
from moeprof.importers.warmup import WarmupDetector, pass_starts, split_passes
from moeprof.errors import ImportFormatError, UsageError

try:  # orjson parses ~3x faster when present; the stdlib is the fallback
    from orjson import loads as _json_loads
except ImportError:  # pragma: no cover - depends on the environment
    _json_loads = json.loads

FIELDS = ("req_id", "token_idx", "layer", "topk_ids", "topk_weights", "phase", "step", "batch_id", "token_id")
REQUIRED = ("req_id", "token_idx", "layer", "topk_ids")
META_MARK = "meta"
FORMAT_NAME = "moeprof-routing-jsonl"


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
        names = self.names
        buf = _Buffer()
        unit_key: Any = object()
        self._data_seen = False
        self._warmup, self._pass_last = WarmupDetector(), {}  # each file warms up on its own
        for lineno, obj in json_records(path, progress, "JSONL routing log"):
            if buf.first_line is None and self._meta_allowed(lineno, buf) and _is_meta(obj, names):
                self._read_meta(obj, path, lineno)
                continue
            for f in REQUIRED:
                if names[f] not in obj:
                    raise bad(path, f"line {lineno}", f"field {names[f]!r} is missing"
                              + (f" (use --field {f}=NAME if it has another name)" if names[f] == f else ""))
            key = obj[names["req_id"]]
            if isinstance(key, float) and key.is_integer():
                key = int(key)
            if key != unit_key or buf.rows >= self.options.chunk_rows:
                yield from self._flush(buf, path, unit_key)
                if key != unit_key:
                    self._pass_last.clear()
                unit_key = key
            self._add(buf, obj, key, path, lineno)
        yield from self._flush(buf, path, unit_key)
        self._finish_missing()

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
            self._k, self._k_line = len(ids), lineno
        elif len(ids) != self._k:
            raise bad(path, where, f"inconsistent top-k: {len(ids)} expert ids here, {self._k} on line {self._k_line}")
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
        layer = np.asarray(buf.layer, dtype=np.int64)
        experts = np.asarray(buf.experts, dtype=np.int64)
        token_id = np.asarray(buf.token_id, dtype=np.int64) if buf.token_id else None
        keys = buf.keys
        pos = np.asarray(buf.pos, dtype=np.int32)
        weights = np.asarray(buf.weights, dtype=np.float32) if buf.weights else None
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
            cols = dict(layer=layer, experts=experts, weights=weights, token_id=token_id)
            runs = split_passes(cols, pass_starts(pos, layer, self._pass_last), self._warmup)
        step = np.asarray(buf.step, dtype=np.int32)
        phase = np.asarray(buf.phase, dtype=np.int8)
        batch_id = np.asarray(buf.batch_id, dtype=np.int64) if buf.batch_id else None
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
    def __init__(self) -> None:
        self.k: int | None = None
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
        self.first_line: int | None = None
        self.last_line: int | None = None

    @property
    def rows(self) -> int:
        return len(self.layer)


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


def json_records(path: Path, progress: Callable[[int], None], what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank line of a JSONL file; a bad line names ``path:line``."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            progress(len(raw))
            if not raw.strip():
                continue
            try:
                obj = _json_loads(raw)
            except ValueError:
                raise bad(path, f"line {lineno}", f"not valid JSON (the file is cut off here, or not a {what})") from None
            if not isinstance(obj, dict):
                raise bad(path, f"line {lineno}", "expected a JSON object per line")
            yield lineno, obj


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
