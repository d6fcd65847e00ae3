"""Render a :class:`~moeprof.report.document.Report` as GitHub-flavoured Markdown for a CI job summary.

A job summary cannot show local images, so figures are named, not embedded; the findings and the
first rows of each table carry the message, and the page points at the full HTML artifact.
"""

from __future__ import annotations

from moeprof.report.document import Report, Table

EXTENSION = ".md"
MAX_ROWS = 12


def render_markdown(report: Report, *, max_rows: int = MAX_ROWS) -> str:
    lines = [f"## {report.title}", "", f"_{_inline(report.subtitle)}_", ""]
    if report.facts:
        lines += ["| | |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in report.facts]
        lines.append("")
    lines += ["### Findings", ""]
    for s in report.sections:
        if s.finding:
            lines.append(f"- **{s.title}**: {_inline(s.finding)}")
        elif s.unavailable:
            lines.append(f"- **{s.title}**: not available ({_inline(s.unavailable)})")
    lines.append("")
    for s in report.sections:
        if not s.tables:
            continue
        lines += [f"### {s.title}", ""]
        for t in s.tables[:1]:
            lines += _table(t, max_rows)
    lines += [
        "",
        f"<sub>moeprof {report.moeprof_version}, {report.generated_at}. "
        "Figures and every table are in the HTML report (index.html).</sub>",
        "",
    ]
    return "\n".join(lines)


def _table(t: Table, max_rows: int) -> list[str]:
    numeric = t.numeric or [False] * len(t.columns)
    out = []
    if t.caption:
        out += [f"{_inline(t.caption)}", ""]
    columns = t.columns if t.header else ["" for _ in t.columns]
    out.append("| " + " | ".join(_cell(c) for c in columns) + " |")
    out.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    for row in t.rows[:max_rows]:
        out.append("| " + " | ".join(_cell(str(v)) for v in row) + " |")
    if len(t.rows) > max_rows:
        out.append(f"\n_{len(t.rows) - max_rows} more rows in the HTML report._")
    out.append("")
    return out


def _cell(text: str) -> str:
    return _inline(text).replace("|", "\\|")


def _inline(text: str) -> str:
    return text.replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")
