"""What every importer shares: options, the chunks it yields, and warm-up rules.

An importer reads one engine's dump and yields :class:`RoutingChunk` (per-token rows) or
:class:`LoadsChunk` (counts) a bounded piece at a time; :func:`moeprof.importers.run.import_trace`
validates the chunks, drops warm-up when asked, and hands them to a :class:`~moeprof.trace.writer.TraceWriter`.
An importer never guesses: whatever its source does not record goes into ``missing`` with the reason.

Glossary for this package (see also :mod:`moeprof.glossary`):

record
    One unit of the source as the engine wrote it: a JSONL line, one forward pass of a ``.pt`` dump,
    one CSV/Parquet row group. Errors name the file and the record number (1-based; a line number for
    text files).
unit
    The group of rows a warm-up rule looks at: one forward pass (SGLang, Megatron) or one request
    (vLLM, JSONL).
warm-up
    Forward passes an engine runs on dummy inputs before serving (memory profiling, CUDA-graph
    capture, server warm-up). They go through the same hooks and land in the dump.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from moeprof.errors import ImportFormatError

PREFILL, DECODE = 0, 1

# A unit with at least this many tokens whose every token routes identically in every layer is a
# dummy input (engines warm up on repeated token ids); a real prompt never does that.
MIN_IDENTICAL_TOKENS = 4

WARMUP_NO_REQUEST = "no request id before the first real request (engine warm-up / profiling pass)"
WARMUP_IDENTICAL = (
    f"every token routed identically in every layer (>= {MIN_IDENTICAL_TOKENS} tokens: dummy input)"
)
WARMUP_EMPTY = "all-zero counts (an unfilled slot of the engine's buffer)"


@dataclass
class ImportOptions:
    """What the user told ``moeprof import`` beyond the files themselves."""

    model_name: str | None = None
    num_experts: int | None = None
    top_k: int | None = None
    domains: Path | None = None
    phase_from: str = "auto"
    drop_warmup: bool = False
    force: bool = False
    fields: dict[str, str] = field(default_factory=dict)
    """Field renames for JSON sources: canonical name -> the name in the file."""
    shard_rows: int = 1 << 20
    chunk_rows: int = 65536
    """Rows an importer gathers before it yields a chunk (the memory bound of one chunk)."""


@dataclass
class RoutingChunk:
    """Per-token rows of one unit or part of one. Shapes: ``experts``/``weights`` ``(n, k)``, rest ``(n,)``."""

    request_key: list[Any] | np.ndarray
    """The source's request ids (ints or strings; ``None`` where the source has none)."""
    step: np.ndarray
    phase: np.ndarray
    pos: np.ndarray
    layer: np.ndarray
    experts: np.ndarray
    where: str
    """File and record(s) the rows came from, for error messages."""
    weights: np.ndarray | None = None
    batch_id: np.ndarray | None = None
    token_id: np.ndarray | None = None
    warmup: str | None = None
    """Why this chunk looks like warm-up, or ``None``."""

    @property
    def rows(self) -> int:
        return int(self.experts.shape[0])


@dataclass
class LoadsChunk:
    """Count rows: columns of ``LOADS_SCHEMA`` (``window, phase, layer, expert, count, request_id, domain``)."""

    table: pa.Table
    where: str
    warmup: str | None = None
    request_keys: list[Any] | None = None
    """Source request ids per row (for the domain map), or ``None``."""

    @property
    def rows(self) -> int:
        return self.table.num_rows


Chunk = RoutingChunk | LoadsChunk


class Importer:
    """One source format. Subclasses set ``name``/``source`` and implement :meth:`read` and :meth:`sniff`.

    While :meth:`read` runs it fills ``missing`` (capability -> reason), ``notes``, and what the
    source says about the model (``model_name``, ``num_experts``, ``top_k``, ``num_layers``).
    """

    name = ""
    source = ""
    description = ""
    accepts_directories = False
    """True if a source may be a directory (the importer walks it itself)."""

    def __init__(self, options: ImportOptions) -> None:
        self.options = options
        self.missing: dict[str, str] = {}
        self.notes: list[str] = []
        self.skipped: dict[str, int] = {}
        self.model_name: str | None = None
        self.num_experts: int | None = None
        self.top_k: int | None = None
        self.num_layers: int | None = None
        self.capture: dict[str, Any] = {}
        self.domains: dict[str, str] = {}
        """Request id (as text) -> domain, where the source itself records domains."""

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        """True if ``head`` (the first bytes of ``path``) has this format's structure."""
        raise NotImplementedError

    def read(self, path: Path, progress: Callable[[int], None]) -> Iterator[Chunk]:
        """Yield chunks; call ``progress(n)`` with bytes (or records) consumed."""
        raise NotImplementedError

    def skip(self, reason: str, rows: int) -> None:
        if rows <= 0:
            return
        self.skipped[reason] = self.skipped.get(reason, 0) + int(rows)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def bad(path: Path | str, where: str, what: str) -> ImportFormatError:
    """The error for a malformed record: ``FILE: WHERE: WHAT``."""
    return ImportFormatError(f"{path}: {where}: {what}")


def not_utf8(path: Path | str, lineno: int, raw: bytes, advice: str = "save the file as UTF-8") -> ImportFormatError | None:
    """The error for a line whose bytes are not UTF-8 (``None`` if they are): the first bad byte and
    where it is in the line, since the line as text cannot be shown."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad(path, f"line {lineno}", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of "
                   f"the line); {advice} (e.g. iconv -f latin1 -t utf-8)")
    return None


def first_non_utf8_line(path: Path | str) -> ImportFormatError:
    """The error naming the first line of ``path`` that is not UTF-8. Text files are decoded in blocks,
    so a decoding error does not say which line: the file is read again, as bytes (only on that error)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            error = not_utf8(path, lineno, raw)
            if error is not None:
                return error
    return ImportFormatError(f"{path}: not UTF-8 text; save the file as UTF-8")


def distinct(values: Any) -> np.ndarray:
    """The sorted distinct values of ``values``, as ``np.unique(values)``.

    Plain ``np.unique`` imports ``numpy.ma`` on its first call in numpy 2.4 (to ask whether the
    array is masked): about 20 ms once per process, a fifth of importing 10,000 rows. Asking for the
    counts takes the path that does not.
    """
    return np.unique(values, return_counts=True)[0]


def identical_routing(layer: np.ndarray, experts: np.ndarray, token_id: np.ndarray | None = None) -> bool:
    """True if this unit is a dummy input: >= MIN_IDENTICAL_TOKENS tokens, every one routed alike per layer.

    ``layer`` ``(n,)``, ``experts`` ``(n, k)``; a unit's tokens are the rows of one layer.
    """
    if experts.shape[0] == 0:
        return False
    for lay in distinct(layer):
        sel = experts[layer == lay]
        if sel.shape[0] < MIN_IDENTICAL_TOKENS or not (sel == sel[0]).all():
            return False
    if token_id is not None:
        tok = np.asarray(token_id)
        if tok.size and not (tok == tok[0]).all():
            return False
    return True


def _csv_rows(path: Path, columns: tuple[str, ...], needs: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV whose header holds ``columns``; ``needs`` is the error for a header without
    them (``{found}``: the header's columns). Read as UTF-8 (a spreadsheet's "CSV UTF-8" byte-order mark is not part of
    the header); a line that is not UTF-8 is named."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        try:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            if not set(columns) <= set(cols):
                raise ImportFormatError(f"{path}: line 1: " + needs.format(found=", ".join(cols) or "nothing"))
            for row in reader:
                yield reader.line_num, row
        except UnicodeDecodeError:
            raise first_non_utf8_line(path) from None


def read_domain_map(path: Path) -> dict[str, str]:
    """``request_id,domain`` CSV (header required) -> {request id as text: domain}."""
    path = Path(path)
    if not path.exists():
        raise ImportFormatError(f"{path}: domain map not found")
    out: dict[str, str] = {}
    line_of: dict[str, int] = {}
    for i, row in _csv_rows(path, ("request_id", "domain"),
                            "the domain map needs a header with columns request_id,domain (found {found})"):
        rid, dom = (row.get("request_id") or "").strip(), (row.get("domain") or "").strip()
        if not rid or not dom:
            raise ImportFormatError(f"{path}: line {i}: empty request_id or domain")
        if out.get(rid, dom) != dom:  # the same request twice: one label would win in silence
            raise ImportFormatError(f"{path}: line {i}: request {rid} is mapped to {dom} here and to "
                                    f"{out[rid]} on line {line_of[rid]}; give each request one domain")
        out[rid] = dom
        line_of.setdefault(rid, i)
    return out


def read_prompt_lens(path: Path) -> dict[str, int]:
    """``request_id,prompt_tokens`` CSV -> {request id as text: prompt length} (for ``--phase-from``)."""
    path = Path(path)
    if not path.exists():
        raise ImportFormatError(f"{path}: prompt-length file not found")
    out: dict[str, int] = {}
    for i, row in _csv_rows(path, ("request_id", "prompt_tokens"),
                            "--phase-from prompt-len needs a CSV with columns request_id,prompt_tokens"):
        try:
            out[row["request_id"].strip()] = int(row["prompt_tokens"])
        except (TypeError, ValueError):
            raise ImportFormatError(f"{path}: line {i}: prompt_tokens is not an integer") from None
    return out


def phase_code(value: Any) -> int | None:
    """Map a phase as engines write it (``prefill``/``decode``, 0/1, ``EXTEND``/``DECODE``) to a code."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value) if value in (0, 1) else None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("prefill", "extend", "context", "prompt"):
            return PREFILL
        if v in ("decode", "generation", "generate"):
            return DECODE
    return None
