"""Render a :class:`~moeprof.report.document.Report` as one self-contained HTML page.

Self-contained means: opened from disk with no network it looks the same. CSS is inline, figures are
``data:`` URIs (SVG as ``image/svg+xml`` so each figure keeps its own ids and cannot fetch anything),
fonts are the system's, links are in-page anchors only, and there is no script.
"""

from __future__ import annotations

from html import escape

from moeprof.report.document import Figure, Report, Section, Table

EXTENSION = ".html"

CSS = """
:root { --fg:#1d232b; --muted:#5b6673; --line:#d9dee4; --bg:#ffffff; --panel:#f5f7f9; --accent:#2459a8;
        --warn:#9a5b00; }
* { box-sizing: border-box; }
html { font-size: 15px; }
body { margin: 0; color: var(--fg); background: var(--bg); line-height: 1.5;
       font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 64px; }
header h1 { font-size: 1.7rem; margin: 0 0 2px; }
header .subtitle { color: var(--muted); margin: 0 0 14px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0 0 18px;
           font-size: .93rem; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
nav.toc { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 10px 16px;
          margin-bottom: 28px; }
nav.toc h2 { font-size: 1rem; margin: 0 0 6px; }
nav.toc ol { margin: 0; padding-left: 20px; }
nav.toc li { margin: 3px 0; }
nav.toc a { color: var(--accent); text-decoration: none; font-weight: 600; }
nav.toc .finding { color: var(--fg); font-weight: normal; }
nav.toc .na { color: var(--warn); }
section { border-top: 1px solid var(--line); padding-top: 14px; margin-top: 30px; }
section h2 { font-size: 1.3rem; margin: 0 0 6px; }
p.finding { font-size: 1.08rem; font-weight: 600; margin: 0 0 12px; border-left: 4px solid var(--accent);
            padding: 4px 0 4px 12px; background: var(--panel); }
p.unavailable { color: var(--warn); border-left: 4px solid var(--warn); padding: 4px 0 4px 12px;
                background: #fff8ec; margin: 0 0 12px; }
p.note { color: var(--muted); font-size: .9rem; margin: 4px 0; }
figure { margin: 14px 0 18px; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; background: #fff; }
figcaption { color: var(--muted); font-size: .88rem; margin-top: 4px; }
.table-wrap { overflow-x: auto; margin: 10px 0 16px; }
table { border-collapse: collapse; font-size: .88rem; font-variant-numeric: tabular-nums; }
p.caption { color: var(--muted); font-size: .88rem; margin: 0 0 4px; }
table.kv td:first-child { color: var(--muted); }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: var(--panel); font-weight: 600; }
td.num, th.num { text-align: right; }
tbody tr:nth-child(even) td { background: #fafbfc; }
footer { color: var(--muted); font-size: .85rem; margin-top: 40px; border-top: 1px solid var(--line);
         padding-top: 10px; }
@media (max-width: 700px) { main { padding: 14px; } html { font-size: 14px; } }
@media print {
  html { font-size: 11pt; }
  main { max-width: none; padding: 0; }
  nav.toc { break-after: page; }
  section { break-before: auto; }
  figure, .table-wrap, p.finding { break-inside: avoid; }
  figure img { max-height: 22cm; border: none; }
  .table-wrap { overflow: visible; }
  th { background: #eee !important; -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  a { color: inherit; text-decoration: none; }
}
"""


def render_html(report: Report) -> str:
    """The whole page as a string."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # No request of any kind: forbid every fetch except inline data, whatever the content says.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        f"<title>{escape(report.title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        "<header>",
        f"<h1>{escape(report.title)}</h1>",
        f'<p class="subtitle">{escape(report.subtitle)}</p>',
    ]
    if report.facts:
        parts.append('<dl class="facts">')
        for label, value in report.facts:
            parts.append(f"<dt>{escape(label)}</dt><dd>{escape(value)}</dd>")
        parts.append("</dl>")
    parts.append("</header>")
    parts.append(_toc(report.sections))
    parts.extend(_section(s) for s in report.sections)
    parts.append(
        "<footer>"
        f"Made by moeprof {escape(report.moeprof_version)} on {escape(report.generated_at)} from "
        + ", ".join(f"<code>{escape(i)}</code>" for i in report.inputs)
        + ". The numbers behind this page are in <code>report.json</code> next to it.</footer>"
    )
    parts += ["</main>", "</body>", "</html>", ""]
    return "\n".join(parts)


def _toc(sections: list[Section]) -> str:
    # Titles only: each finding is said once, in its section's opening sentence.
    items = []
    for s in sections:
        tail = ' <span class="na">(not available)</span>' if s.unavailable and not s.finding else ""
        items.append(f'<li><a href="#{escape(s.key)}">{escape(s.title)}</a>{tail}</li>')
    return '<nav class="toc"><h2>Contents</h2><ol>' + "".join(items) + "</ol></nav>"


def _section(s: Section) -> str:
    out = [f'<section id="{escape(s.key)}">', f"<h2>{escape(s.title)}</h2>"]
    if s.finding:
        out.append(f'<p class="finding">{escape(s.finding)}</p>')
    if s.unavailable:
        out.append(f'<p class="unavailable">Not available: {escape(s.unavailable)}</p>')
    out.extend(_figure(f) for f in s.figures)
    out.extend(_table(t) for t in s.tables)
    out.extend(f'<p class="note">{escape(n)}</p>' for n in s.notes)
    out.append("</section>")
    return "\n".join(out)


def _figure(f: Figure) -> str:
    return (
        f'<figure><img src="{f.data_uri()}" alt="{escape(f.title)}" loading="eager">'
        f"<figcaption>{escape(f.title)}</figcaption></figure>"
    )


def _table(t: Table) -> str:
    numeric = t.numeric or [False] * len(t.columns)

    def cls(i: int) -> str:
        return ' class="num"' if i < len(numeric) and numeric[i] else ""

    head = "".join(f"<th{cls(i)}>{escape(c)}</th>" for i, c in enumerate(t.columns))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{escape(str(v))}</td>" for i, v in enumerate(row)) + "</tr>" for row in t.rows
    )
    caption = f'<p class="caption">{escape(t.caption)}</p>' if t.caption else ""
    thead = f"<thead><tr>{head}</tr></thead>" if t.header else ""
    kind = "" if t.header else ' class="kv"'
    return f'<div class="table-wrap">{caption}<table{kind}>{thead}<tbody>{body}</tbody></table></div>'
