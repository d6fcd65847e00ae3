"""Drive one import: detect the format, stream the importer's chunks into a trace, report what happened.

Everything an importer yields is checked here, once, for every format: top-k consistent across
records, expert ids inside ``[0, num_experts)``, warm-up counted (and dropped with ``drop_warmup``),
request ids mapped to the trace's int64 ids and to domains. The report says how many rows were
dropped or skipped and why; the same sentences go into the manifest's ``notes``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from moeprof.importers.base import (
    DECODE,
    PREFILL,
    ImportOptions,
    Importer,
    LoadsChunk,
    RoutingChunk,
    distinct,
    read_domain_map,
)
from moeprof.errors import ImportFormatError, UsageError
from moeprof.outputs import check_target, refuse_overwriting_input
from moeprof.trace.manifest import Manifest, ModelInfo
from moeprof.trace.schema import LOADS_SCHEMA, UNLABELLED
from moeprof.trace.writer import TraceWriter, phase_array

UNKNOWN_DOMAIN = UNLABELLED  # requests without a domain: the same word as capture's


@dataclass
class ImportReport:
    """What an import wrote and what it left out."""

    out: Path
    format: str
    sources: list[Path]
    routing_rows: int = 0
    loads_rows: int = 0
    requests: int = 0
    warmup: dict[str, int] = field(default_factory=dict)
    """Reason -> rows that looked like warm-up (dropped when ``warmup_dropped``)."""
    warmup_dropped: bool = False
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> rows the source holds that are not routing of a model layer (always left out)."""
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    manifest: Manifest | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "format": self.format,
            "sources": [str(s) for s in self.sources],
            "routing_rows": self.routing_rows,
            "loads_rows": self.loads_rows,
            "requests": self.requests,
            "warmup_rows": self.warmup,
            "warmup_dropped": self.warmup_dropped,
            "skipped_rows": self.skipped,
            "missing": self.missing,
            "notes": self.notes,
        }


class _Requests:
    """Source request keys -> trace request ids, with per-request token counts and domains."""

    def __init__(self, domains: dict[str, str] | None) -> None:
        self.domains = domains
        self.ids: dict[Any, int] = {}
        self._taken: set[int] = set()
        self._next = 0
        self.rows: dict[int, list[int]] = {}  # id -> [prefill rows, decode rows]
        self.key_of: dict[int, Any] = {}

    def map(self, keys: Any, where: str) -> np.ndarray:
        if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
            for k in distinct(keys).tolist():
                self._register(int(k), where)
            return keys.astype(np.int64, copy=False)
        if isinstance(keys, list) and keys and keys.count(keys[0]) == len(keys):
            # one request's chunk (nearly always): one lookup, not one per row (0.8 s of a 1.3 M-row import)
            return np.full(len(keys), self._register(keys[0], where), np.int64)
        out = np.empty(len(keys), dtype=np.int64)
        cache: dict[Any, int] = {}
        for i, k in enumerate(keys):
            rid = cache.get(k)
            if rid is None:
                rid = cache[k] = self._register(k, where)
            out[i] = rid
        return out

    def _register(self, key: Any, where: str) -> int:
        if key is None:
            return -1
        rid = self.ids.get(key)
        if rid is not None:
            return rid
        if isinstance(key, (int, np.integer)):
            rid = int(key)
            if rid in self._taken:
                raise ImportFormatError(
                    f"{where}: request id {rid} clashes with an id already given to a text request id; "
                    "use one kind of request id per import"
                )
        else:
            while self._next in self._taken or self._next in self.ids:
                self._next += 1
            rid = self._next
            self._next += 1
        self.ids[key] = rid
        self._taken.add(rid)
        self.key_of[rid] = key
        return rid

    def count(self, rid: np.ndarray, phase: np.ndarray) -> None:
        if rid.size == 0:
            return
        rid = rid.astype(np.int64, copy=False)
        if rid[0] == rid[-1] and (rid == rid[0]).all():  # one request's chunk (nearly always)
            row = self.rows.setdefault(int(rid[0]), [0, 0])
            decode = int(np.count_nonzero(phase))
            row[0] += rid.size - decode
            row[1] += decode
            return
        if -(1 << 61) < rid.min() and rid.max() < (1 << 61):
            # (request, phase) as one integer 2 * request + phase: a 1-D unique (unique along an axis
            # sorts rows as opaque records, several times slower); ids of -1 (no request) decode right too
            pairs, counts = np.unique(rid * 2 + phase, return_counts=True)
            found = zip(np.right_shift(pairs, 1).tolist(), np.bitwise_and(pairs, 1).tolist())
        else:  # ids near the ends of int64 (hashes, say): 2 * id would wrap
            pairs, counts = np.unique(np.stack([rid, phase.astype(np.int64)]), axis=1, return_counts=True)
            found = pairs.T.tolist()
        for (r, p), c in zip(found, counts.tolist()):
            self.rows.setdefault(r, [0, 0])[p] += c

    def domain(self, rid: int) -> str:
        if self.domains is None:
            return UNKNOWN_DOMAIN
        return self.domains.get(str(self.key_of.get(rid, rid)), UNKNOWN_DOMAIN)


def import_trace(
    fmt: str,
    sources: Sequence[str | Path],
    out: str | Path,
    options: ImportOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import ``sources`` (all of one format; ``fmt="auto"`` detects it) into the trace directory ``out``.

    ``progress(n)`` is called with the number of source bytes consumed since the last call.
    """
    from moeprof.importers import FORMATS, detect, importer_class

    options = options or ImportOptions()
    paths = [Path(s) for s in sources]
    if not paths:
        raise UsageError("no source files given; name at least one dump to import")
    for i, p in enumerate(paths):
        if not p.exists():
            raise ImportFormatError(f"{p}: no such file")
        twin = next((q for q in paths[:i] if os.path.samefile(q, p)), None)
        if twin is not None:  # a shell glob that overlaps: every row would count twice
            raise UsageError(f"{p}: the same file as {twin}, named twice; each source must be named once "
                             "(its rows would be counted twice)")
        refuse_overwriting_input(out, p, f"{p}, a source being read")
        # only a named format's importer is imported (the others cost each import 17-33 ms)
        if p.is_dir() and not (fmt == "auto" or fmt in FORMATS and importer_class(fmt).accepts_directories):
            raise ImportFormatError(f"{p}: is a directory; name the dump files inside it")
    if fmt == "auto":
        found = {p: detect(p) for p in paths}
        kinds = sorted(set(found.values()))
        if len(kinds) > 1:
            listing = ", ".join(f"{p.name}={k}" for p, k in found.items())
            raise UsageError(f"the sources are of different formats ({listing}); import them separately")
        fmt = kinds[0]
    if fmt not in FORMATS:
        raise UsageError(f"unknown import format {fmt!r}; choose one of: auto, {', '.join(FORMATS)}")
    if fmt != "expert-selection":  # which reads a .tar.gz; the others read the dump as the engine wrote it
        from moeprof.importers import COMPRESSORS, compression

        for p in paths:
            if p.is_file():
                with open(p, "rb") as fh:
                    packed = compression(fh.read(8))
                if packed:
                    raise ImportFormatError(f"{p}: {packed}-compressed; decompress it first "
                                            f"({COMPRESSORS[packed]} {p}) and import the result")
    if (options.phase_from or "auto") != "auto" and fmt != "jsonl":
        raise UsageError(
            f"--phase-from applies to per-token JSONL only; {fmt} sources record the phase themselves "
            "or the trace marks it missing"
        )
    importer = importer_class(fmt)(options)
    domains = read_domain_map(options.domains) if options.domains else None
    check_target(out, options.force)  # before reading any source
    return _Run(importer, fmt, paths, Path(out), options, domains, progress).run()


class _Run:
    def __init__(self, importer, fmt, paths, out, options, domains, progress) -> None:
        self.importer: Importer = importer
        self.report = ImportReport(out=out, format=fmt, sources=paths, warmup_dropped=options.drop_warmup)
        self.paths = paths
        self.out = out
        self.options = options
        self.requests = _Requests(domains)
        self.progress = progress or (lambda n: None)
        self.writer: TraceWriter | None = None
        self.top_k: int | None = options.top_k
        self.layers: set[int] = set()
        self.max_expert = -1
        self.has_loads_requests = False

    # -- writer ----------------------------------------------------------------------------------
    def _open(self, top_k: int | None) -> TraceWriter:
        imp, opt = self.importer, self.options
        k = opt.top_k or imp.top_k or top_k
        if not k:
            k = 1
            imp.note("top_k unknown (the source holds counts only): recorded as 1; pass --top-k to state it")
        model = ModelInfo(
            name=opt.model_name or imp.model_name or "unknown",
            num_experts=int(opt.num_experts or imp.num_experts or 0),
            top_k=int(k),
            moe_layers=[],
            num_layers=imp.num_layers,
        )
        self.writer = TraceWriter(
            self.out,
            model=model,
            source=imp.source,
            capture={"importer": imp.name, "files": [str(p) for p in self.paths]},
            force=opt.force,
            shard_rows=opt.shard_rows,
            staged=True,  # a failed import leaves nothing behind
        )
        self.top_k = model.top_k
        return self.writer

    # -- main loop -------------------------------------------------------------------------------
    def run(self) -> ImportReport:
        try:
            for path in self.paths:
                for chunk in self.importer.read(path, self.progress):
                    if isinstance(chunk, RoutingChunk):
                        self._routing(chunk)
                    else:
                        self._loads(chunk)
            if self.writer is None:
                raise ImportFormatError(
                    f"{', '.join(map(str, self.paths))}: no routing records found "
                    f"(format {self.report.format}); is this the right file?"
                )
            return self._finish()
        except BaseException:
            if self.writer is not None:
                self.writer.close(complete=False)
            raise

    def _warmup(self, reason: str | None, rows: int) -> bool:
        """Count a warm-up chunk; True if it is to be dropped."""
        if reason is None:
            return False
        self.report.warmup[reason] = self.report.warmup.get(reason, 0) + rows
        return self.options.drop_warmup

    def _check_experts(self, experts: np.ndarray, where: str) -> None:
        if experts.size == 0:
            return
        lo, hi = int(experts.min()), int(experts.max())
        limit = self.options.num_experts or self.importer.num_experts
        if lo < 0:
            raise ImportFormatError(f"{where}: expert id {lo} is negative")
        if limit and hi >= limit:
            raise ImportFormatError(
                f"{where}: expert id {hi} is out of range for {limit} experts "
                f"(ids run 0..{limit - 1}); check --num-experts"
            )
        self.max_expert = max(self.max_expert, hi)

    def _routing(self, c: RoutingChunk) -> None:
        if c.rows == 0 or self._warmup(c.warmup, c.rows):
            return
        k = c.experts.shape[1]
        writer = self.writer or self._open(k)
        if k != self.top_k:
            raise ImportFormatError(
                f"{c.where}: inconsistent top-k: {k} experts per token here, {self.top_k} "
                + ("in earlier records" if self.report.routing_rows
                   else "from --top-k" if self.options.top_k else "as the source's meta line states")
            )
        self._check_experts(c.experts, c.where)
        rid = self.requests.map(c.request_key, c.where)
        phase = np.asarray(c.phase, dtype=np.int8)
        writer.write_routing(
            dict(
                request_id=rid,
                step=c.step,
                phase=phase,
                pos=c.pos,
                layer=c.layer,
                experts=c.experts,
                weights=c.weights,
                batch_id=c.batch_id,
                token_id=c.token_id,
            )
        )
        self.requests.count(rid, phase)
        self.layers.update(distinct(c.layer).tolist())
        self.report.routing_rows += c.rows

    def _loads(self, c: LoadsChunk) -> None:
        if c.rows == 0 or self._warmup(c.warmup, c.rows):
            return
        writer = self.writer or self._open(None)
        t = c.table
        self._check_experts(t.column("expert").to_numpy(), c.where)
        if c.request_keys is not None:
            rid = self.requests.map(c.request_keys, c.where)
            has = rid >= 0
            dom = t.column("domain").to_pylist() if "domain" in t.column_names else [None] * len(rid)
            dom = [d if d is not None else (self.requests.domain(int(r)) if h else None)
                   for d, r, h in zip(dom, rid.tolist(), has.tolist())]
            t = t.drop_columns([n for n in ("request_id", "domain") if n in t.column_names])
            t = t.append_column("request_id", pa.array(np.where(has, rid, 0), pa.int64(), mask=~has))
            t = t.append_column("domain", pa.array(dom, pa.string()))
            self.has_loads_requests = self.has_loads_requests or bool(has.any())
            for r in distinct(rid[has]).tolist():
                self.requests.rows.setdefault(int(r), [0, 0])
        writer.write_loads(t.select(LOADS_SCHEMA.names).cast(LOADS_SCHEMA))
        self.layers.update(distinct(t.column("layer").to_numpy()).tolist())
        self.report.loads_rows += c.rows

    # -- manifest --------------------------------------------------------------------------------
    def _finish(self) -> ImportReport:
        imp, opt, writer, report = self.importer, self.options, self.writer, self.report
        assert writer is not None
        model = writer.manifest.model
        model.moe_layers = sorted(int(x) for x in self.layers)
        model.num_experts = model.num_experts or int(imp.num_experts or 0)
        if model.num_layers is None:
            model.num_layers = imp.num_layers
        if not model.num_experts:
            model.num_experts = self.max_expert + 1
            imp.note(
                f"num_experts not stated by the source or --num-experts: taken as the largest expert id + 1 "
                f"= {model.num_experts}; pass --num-experts if some experts never received a token"
            )
        if model.num_layers is None and model.moe_layers:
            imp.note("num_layers unknown: the source names only the MoE layers it recorded")
        if self.requests.domains is None and imp.domains:
            self.requests.domains = imp.domains
        missing = dict(imp.missing)
        if report.loads_rows and not report.routing_rows:
            missing.setdefault("per_token", f"{imp.name} source holds counts, not per-token routing")
        notes = list(imp.notes)
        for reason, rows in report.warmup.items():
            verb = "dropped" if opt.drop_warmup else "kept (pass --drop-warmup to drop them)"
            notes.append(f"warm-up: {rows} rows {verb}: {reason}")
        for reason, rows in imp.skipped.items():
            notes.append(f"skipped: {rows} rows: {reason}")
        if self.requests.domains is not None:
            seen = [r for r in self.requests.rows if r >= 0]
            mapped = sum(1 for r in seen if self.requests.domain(r) != UNKNOWN_DOMAIN)
            origin = opt.domains or "the source"
            if opt.domains and seen and not mapped:
                raise UsageError(
                    f"--domains {opt.domains}: matches none of the {len(seen)} request ids of the source "
                    f"(e.g. {self.requests.key_of.get(seen[0], seen[0])!r}); check the map's keys"
                )
            notes.append(f"domains: {mapped} of {len(seen)} requests found in {origin}")
        elif "request_ids" not in missing:
            notes.append(f"domains: no --domains map given; every request's domain is '{UNKNOWN_DOMAIN}'")
        n_layers = max(1, len(model.moe_layers))
        for rid, (pre, dec) in sorted(self.requests.rows.items()):
            if rid < 0:
                continue
            writer.set_request(
                rid,
                self.requests.domain(rid),
                prompt_tokens=-(-pre // n_layers),
                decode_tokens=-(-dec // n_layers),
            )
        writer.manifest.missing = missing
        writer.manifest.notes = notes
        writer.manifest.capture.update(imp.capture)
        report.manifest = writer.close(complete=True)
        report.requests = len([r for r in self.requests.rows if r >= 0])
        report.skipped = dict(imp.skipped)
        report.missing = missing
        report.notes = notes
        return report


__all__ = ["import_trace", "ImportReport", "PREFILL", "DECODE", "phase_array"]
