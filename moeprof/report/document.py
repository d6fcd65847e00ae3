"""The report as plain data: sections of one finding, figures and tables, rendered by html/markdown.

Renderers never compute: every sentence and every cell is decided here or by the section builders in
:mod:`moeprof.report.build`, so the HTML page, ``summary.md`` and ``report.json`` always agree.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MIME = {".svg": "image/svg+xml", ".png": "image/png"}


@dataclass
class Figure:
    """An image embedded in the page; ``data`` holds the file's bytes (SVG text or PNG)."""

    title: str
    data: bytes
    mime: str
    source: str | None = None  # the file it was read from, for report.json

    @classmethod
    def from_file(cls, path: Path, title: str) -> "Figure":
        return cls(title=title, data=Path(path).read_bytes(), mime=MIME[Path(path).suffix.lower()], source=str(path))

    def data_uri(self) -> str:
        return f"data:{self.mime};base64," + base64.b64encode(self.data).decode("ascii")


@dataclass
class Table:
    """Cells are already formatted strings; ``numeric[i]`` right-aligns column ``i``."""

    columns: list[str]
    rows: list[list[str]]
    caption: str | None = None
    numeric: list[bool] | None = None
    header: bool = True  # False: a key / value list, columns are not shown

    def __post_init__(self) -> None:
        if self.numeric is None:
            self.numeric = [i > 0 for i in range(len(self.columns))]


@dataclass
class Section:
    """One question the report answers. ``unavailable`` says why it cannot be answered from the inputs."""

    key: str
    title: str
    finding: str | None = None
    unavailable: str | None = None
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    title: str
    subtitle: str
    sections: list[Section]
    inputs: list[str]
    generated_at: str
    moeprof_version: str
    facts: list[tuple[str, str]] = field(default_factory=list)  # (label, value) shown under the title

    def to_json(self) -> dict[str, Any]:
        """Everything but the image bytes (those are files next to the summary, named in ``source``)."""
        out = asdict(self)
        for sec_json, sec in zip(out["sections"], self.sections):
            sec_json["figures"] = [{"title": f.title, "mime": f.mime, "source": f.source} for f in sec.figures]
        return out


def fmt(x: float | int | None, digits: int = 2) -> str:
    """A number for a table cell: ``-`` for missing, thousands separators for integers."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if x != x:  # NaN
        return "-"
    return f"{x:,.{digits}f}"
