"""A plain counts table (CSV or Parquet): ``layer, expert, count`` and optional ``domain, phase, request_id, window``.

For any source that only publishes counts: SGLang's older CSV dumps (``layer_id,expert_id,count``
renamed with ``--field``), per-domain expert counts published with papers, or tables people build
themselves. Each row is ``count`` token-routes to ``expert`` in ``layer``; ``window`` groups rows of one
batch or time window (default 0). Imported as the trace's ``loads`` tables; there is no per-token
routing, and the manifest says so. Streams: CSV row by row, Parquet row group by row group.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moeprof.importers.base import Importer, LoadsChunk, bad, first_non_utf8_line, phase_code
from moeprof.trace.schema import PHASES

REQUIRED = ("layer", "expert", "count")
OPTIONAL = ("domain", "phase", "request_id", "window")
MODEL = "model"
"""A column that tells models apart (published tables hold several): one value only, or an error."""
_PHASE_TYPE = pa.dictionary(pa.int8(), pa.string())


class CountsImporter(Importer):
    name = "counts"
    source = "counts"
    description = "counts table, CSV or Parquet: layer, expert, count[, domain, phase, request_id, window]"

    def __init__(self, options) -> None:
        super().__init__(options)
        self.names = {f: options.fields.get(f, f) for f in REQUIRED + OPTIONAL}
        self._present: set[str] = set()
        self._model: tuple[str, str] | None = None  # the first row's model, and where it is

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        if head[:4] == b"PAR1":
            try:
                names = set(pq.read_schema(path).names)
            except (pa.ArrowInvalid, OSError):
                return False
            return set(REQUIRED) <= names
        try:
            first = head.decode("utf-8-sig", errors="strict").splitlines()[0]
        except (UnicodeDecodeError, IndexError):
            return False
        cols = {c.strip().lower() for c in next(csv.reader(io.StringIO(first)), [])}
        return set(REQUIRED) <= cols

    def read(self, path: Path, progress: Callable[[int], None]) -> Iterator[LoadsChunk]:
        with open(path, "rb") as fh:
            parquet = fh.read(4) == b"PAR1"
        chunks = self._parquet(path, progress) if parquet else self._csv(path, progress)
        yield from chunks
        absent = "the counts table has no {!r} column"
        self.missing["per_token"] = "a counts table holds counts, not per-token routing"
        for cap, col in (("request_ids", "request_id"), ("phase", "phase")):
            if col not in self._present:
                self.missing[cap] = absent.format(self.names[col])
        for cap in ("weights", "positions", "token_id", "batch_id"):
            self.missing[cap] = "a counts table has no per-token data"

    # -- CSV -------------------------------------------------------------------------------------
    def _csv(self, path: Path, progress) -> Iterator[LoadsChunk]:
        try:
            yield from self._csv_rows(path, progress)
        except UnicodeDecodeError:
            raise first_non_utf8_line(path) from None

    def _csv_rows(self, path: Path, progress) -> Iterator[LoadsChunk]:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark, which is not part of the header
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            try:
                header = [c.strip() for c in next(reader)]
            except StopIteration:
                raise bad(path, "line 1", "empty file: expected a header with layer,expert,count") from None
            idx = self._columns(header, path)
            rows: list[list[str]] = []
            first = 2
            for lineno, row in enumerate(reader, start=2):
                if not row or not any(c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise bad(path, f"line {lineno}", f"{len(row)} fields, the header has {len(header)}"
                              " (a truncated or malformed row)")
                rows.append(row)
                if len(rows) >= self.options.chunk_rows:
                    yield self._table(rows, idx, path, first)
                    progress(sum(len(",".join(r)) + 1 for r in rows))
                    rows, first = [], lineno + 1
            if rows:
                progress(sum(len(",".join(r)) + 1 for r in rows))
                yield self._table(rows, idx, path, first)

    def _columns(self, header: list[str], path: Path) -> dict[str, int]:
        lower = {h.lower(): i for i, h in enumerate(header)}
        idx: dict[str, int] = {}
        for f in REQUIRED + OPTIONAL:
            i = lower.get(self.names[f].lower())
            if i is not None:
                idx[f] = i
            elif f in REQUIRED:
                raise bad(path, "line 1", f"column {self.names[f]!r} is missing (header: {', '.join(header)}); "
                          f"use --field {f}=NAME if it has another name")
        self._present.update(f for f in OPTIONAL if f in idx)
        if MODEL in lower:
            idx[MODEL] = lower[MODEL]
        return idx

    def _one_model(self, models: list[Any], path: Path, row_where: Callable[[int], str]) -> None:
        """Refuse a table whose ``model`` column names two models: their counts would be summed."""
        for j, m in enumerate(models):
            m = "" if m is None else str(m).strip()
            if self._model is None:
                self._model = (m, row_where(j))
            elif m != self._model[0]:
                raise bad(path, row_where(j), f"model {m!r} here, {self._model[0]!r} on {self._model[1]}: a trace "
                          "holds one model's routing; keep one model's rows (e.g. with grep or polars) and import "
                          "each model separately")

    def _table(self, rows: list[list[str]], idx: dict[str, int], path: Path, first_line: int) -> LoadsChunk:
        def ints(col: str) -> np.ndarray:
            out = np.empty(len(rows), dtype=np.int64)
            for j, r in enumerate(rows):
                try:
                    out[j] = int(r[idx[col]])
                except ValueError:
                    raise bad(path, f"line {first_line + j}", f"{self.names[col]} {r[idx[col]]!r} is not an integer") from None
            return out

        cols: dict[str, Any] = {f: ints(f) for f in REQUIRED}
        cols["window"] = ints("window") if "window" in idx else np.zeros(len(rows), np.int64)
        phase = [r[idx["phase"]].strip() for r in rows] if "phase" in idx else None
        domain = [r[idx["domain"]].strip() or None for r in rows] if "domain" in idx else None
        rkeys = None
        if "request_id" in idx:
            rkeys = [_key(r[idx["request_id"]]) for r in rows]
        if MODEL in idx:
            self._one_model([r[idx[MODEL]] for r in rows], path, lambda j: f"line {first_line + j}")
        return self._chunk(cols, phase, domain, rkeys, path, lambda j: f"line {first_line + j}",
                           f"lines {first_line}-{first_line + len(rows) - 1}")

    # -- Parquet ---------------------------------------------------------------------------------
    def _parquet(self, path: Path, progress) -> Iterator[LoadsChunk]:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise bad(path, "footer", f"not a readable Parquet file, or truncated ({_first(exc)})") from None
        idx = self._columns(pf.schema_arrow.names, path)
        names = [pf.schema_arrow.names[i] for i in idx.values()]
        start = 0
        size = path.stat().st_size
        for g in range(pf.num_row_groups):
            try:
                batch = pf.read_row_group(g, columns=names)
            except (pa.ArrowInvalid, OSError) as exc:
                raise bad(path, f"row group {g}", f"cannot be read ({_first(exc)})") from None
            progress(size // max(1, pf.num_row_groups))
            col = {f: batch.column(pf.schema_arrow.names[i]) for f, i in idx.items()}
            cols: dict[str, Any] = {}
            for f in REQUIRED + ("window",):
                if f not in col:
                    cols[f] = np.zeros(batch.num_rows, np.int64)
                    continue
                arr = col[f]
                if not pa.types.is_integer(arr.type) or arr.null_count:
                    raise bad(path, f"row group {g}", f"column {self.names[f]!r} must be non-null integers, is {arr.type}")
                cols[f] = arr.to_numpy().astype(np.int64)
            phase = [("" if v is None else str(v)) for v in col["phase"].to_pylist()] if "phase" in col else None
            domain = col["domain"].to_pylist() if "domain" in col else None
            rkeys = [_key(v) for v in col["request_id"].to_pylist()] if "request_id" in col else None
            s = start
            if MODEL in col:
                self._one_model(col[MODEL].to_pylist(), path, lambda j: f"row {s + j + 1}")
            yield self._chunk(cols, phase, domain, rkeys, path, lambda j: f"row {s + j + 1}",
                              f"row group {g}")
            start += batch.num_rows

    # -- common ----------------------------------------------------------------------------------
    def _chunk(self, cols, phase, domain, rkeys, path, row_where, where) -> LoadsChunk:
        n = len(cols["count"])
        for f in ("count", "layer", "expert"):
            neg = np.flatnonzero(cols[f] < 0)
            if neg.size:
                raise bad(path, row_where(int(neg[0])), f"{self.names[f]} {int(cols[f][neg[0]])} is negative")
        limit = self.options.num_experts
        out = np.flatnonzero(cols["expert"] >= limit) if limit else np.empty(0, np.int64)
        if out.size:
            j = int(out[0])
            raise bad(path, row_where(j), f"expert id {int(cols['expert'][j])} is out of range for {limit} experts "
                      f"(ids run 0..{limit - 1}); check --num-experts")
        big = np.flatnonzero((cols["layer"] > 32767) | (cols["expert"] > 32767))
        if big.size:
            raise bad(path, row_where(int(big[0])), "layer or expert id above 32767")
        if phase is not None:
            codes = []
            for j, p in enumerate(phase):
                if p == "":
                    codes.append(None)
                    continue
                c = phase_code(p)
                if c is None:
                    raise bad(path, row_where(j), f"phase {p!r} is neither prefill nor decode")
                codes.append(PHASES[c])
            phase_arr = pa.array(codes, pa.string()).dictionary_encode().cast(_PHASE_TYPE)
        else:
            phase_arr = pa.nulls(n, _PHASE_TYPE)
        table = pa.table(
            {
                "window": pa.array(cols["window"], pa.int64()),
                "phase": phase_arr,
                "layer": pa.array(cols["layer"].astype(np.int16)),
                "expert": pa.array(cols["expert"].astype(np.int16)),
                "count": pa.array(cols["count"], pa.int64()),
                "request_id": pa.nulls(n, pa.int64()),
                "domain": pa.array(domain if domain is not None else [None] * n, pa.string()),
            }
        )
        return LoadsChunk(table=table, where=f"{path}: {where}", request_keys=rkeys)


def _key(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    s = str(v).strip()
    if not s:
        return None
    try:
        return int(s)
    except ValueError:
        return s


def _first(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
