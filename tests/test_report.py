"""`moeprof report`: structure of index.html / summary.md / report.json, findings, no external URL."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from report_data import analyze_to, hand_trace, synthetic_trace

SECTIONS = ["model", "imbalance", "domain", "prefill_decode", "coactivation"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A synthetic trace analysed, a simulate --compare result beside it, and the report of both."""
    from moeprof.commands.main import main

    root = tmp_path_factory.mktemp("report")
    trace = synthetic_trace(root / "trace")
    analysis = analyze_to(trace, root / "analysis")
    compare = root / "compare"
    compare.mkdir()
    (compare / "compare.json").write_text(json.dumps(COMPARE))
    out = root / "report"
    assert main(["report", str(analysis), str(compare), "--out", str(out)]) == 0
    return root, out


# The layout `moeprof simulate --compare` writes (rows trimmed to the fields the report reads).
COMPARE = {
    "topology": {"nodes": 2, "gpus_per_node": 2, "slots_per_gpu": 4},
    "split": {"test_requests": 12},
    "rows": [
        {"key": "linear", "policy": "linear", "grouping": "random", "cross_node_bytes_per_token": 2000.0,
         "intra_node_bytes_per_token": 1000.0, "local_node_share": 0.5,
         "gpu_load_max_mean": {"median": 1.40, "p90": 1.50}},
        {"key": "locality", "policy": "locality", "grouping": "prefill", "cross_node_bytes_per_token": 1500.0,
         "intra_node_bytes_per_token": 1100.0, "local_node_share": 0.62,
         "gpu_load_max_mean": {"median": 1.20, "p90": 1.30}},
        {"key": "locality+domain", "policy": "locality", "grouping": "domain", "cross_node_bytes_per_token": 1400.0,
         "intra_node_bytes_per_token": 1100.0, "local_node_share": 0.65,
         "gpu_load_max_mean": {"median": 1.20, "p90": 1.30}},
    ],
    "notes": [],
}


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.sections: list[str] = []
        self.findings: list[str] = []
        self._in_finding = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href", "srcset", "action", "poster", "data"):
            if key in a:
                self.refs.append((tag, key, a[key] or ""))
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "p" and a.get("class") == "finding":
            self._in_finding = True
            self.findings.append("")

    def handle_endtag(self, tag):
        if tag == "p":
            self._in_finding = False

    def handle_data(self, data):
        if self._in_finding:
            self.findings[-1] += data


def test_outputs_and_sections(built):
    _, out = built
    assert sorted(p.name for p in out.iterdir()) == [".moeprof", "index.html", "report.json", "summary.md"]
    page = _Links()
    page.feed((out / "index.html").read_text())
    assert page.sections == SECTIONS + ["placement"]
    assert len(page.findings) == 6 and all(f.endswith(".") for f in page.findings)
    # every finding is one sentence: no full stop followed by a capital inside it
    assert not any(re.search(r"\. [A-Z]", f) for f in page.findings)


def test_no_external_reference_of_any_kind(built):
    _, out = built
    html = (out / "index.html").read_text()
    page = _Links()
    page.feed(html)
    imgs = [r for r in page.refs if r[0] == "img"]
    assert len(imgs) >= 6
    for tag, attr, value in page.refs:
        assert value.startswith(("data:image/", "#")), f"<{tag} {attr}={value[:60]!r}> leaves the page"
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", html, re.I)
    assert "http://" not in html and "https://" not in html
    assert "@import" not in html and "url(" not in html and "<script" not in html and "<link" not in html
    assert "default-src 'none'" in html  # the CSP forbids any fetch the page might still contain


def test_findings_are_computed_from_the_numbers(built):
    root, out = built
    summary = json.loads((root / "analysis" / "summary.json").read_text())
    worst = summary["imbalance"]["worst_layer"]
    md = (out / "summary.md").read_text()
    assert (f"**Load imbalance**: Layer {worst['layer']} is the most imbalanced: its busiest expert gets "
            f"{worst['max_over_mean']:.2f}× the mean load over the whole trace") in md
    # No eplb in this comparison: linear is the reference, and its load sets the bound.
    assert ("**Placement comparison**: Policy locality sends the fewest bytes across nodes among policies with the "
            "busiest GPU within 1.1× linear's (held-out requests): 1.5 KiB per token, 25.0% less than linear, busiest "
            "GPU at 1.20× the mean load per micro-batch (median; linear: 1.40×).") in md
    pd = summary["prefill_decode"]
    assert f"aggregate Pearson {pd['aggregate_pearson']:.2f} averaged over layers" in md
    assert "| layer | tokens | max/mean |" in md
    doc = json.loads((out / "report.json").read_text())
    assert doc["summary"] == summary and doc["compare"] == COMPARE
    assert [s["key"] for s in doc["report"]["sections"]] == SECTIONS + ["placement"]


def test_unavailable_sections_say_why(cli, tmp_path):
    trace = hand_trace(tmp_path / "hand")  # one request per domain: no domain classification
    r = cli("report", trace, "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.stderr
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "Domain classification not available: needs at least two domains with two or more requests" in html
    assert (tmp_path / "rep" / "analysis" / "summary.json").exists()  # the analysis it was made from
    assert "Layer 0 is the most imbalanced: its busiest expert gets 2.50× the mean load" in r.stdout
    assert 'id="placement"' not in html  # no placement input, no placement section


def test_counts_only_trace_reports_what_counts_cannot_give(cli, tmp_path):
    import pyarrow as pa

    from moeprof.trace.manifest import ModelInfo
    from moeprof.trace.schema import LOADS_SCHEMA
    from moeprof.trace.writer import TraceWriter, phase_array

    model = ModelInfo(name="counts", architecture="x", num_experts=4, top_k=1, moe_layers=[0], num_layers=1)
    with TraceWriter(tmp_path / "t", model=model, source="counts", force=True,
                     missing={"per_token": "the source logs expert counts per window"}) as w:
        w.write_loads(pa.table({
            "window": pa.array([0, 0, 0, 0], pa.int64()), "phase": phase_array("decode", 4),
            "layer": pa.array([0] * 4, pa.int16()), "expert": pa.array([0, 1, 2, 3], pa.int16()),
            "count": pa.array([30, 10, 10, 10], pa.int64()), "request_id": pa.array([None] * 4, pa.int64()),
            "domain": pa.array([None] * 4, pa.string()),
        }, schema=LOADS_SCHEMA))
    r = cli("report", tmp_path / "t", "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.stderr
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "its busiest expert gets 2.00× the mean load" in md
    assert "- **Co-activation**: not available (the trace holds count tables only" in md


def test_existing_output_needs_force(cli, built):
    root, out = built
    r = cli("report", root / "analysis", "--out", out)
    assert r.exit_code == 2
    assert " ".join(r.stderr.split()) == f"Error: {out / 'index.html'}: exists; pass --force to replace it"


def test_two_analyses_is_a_usage_error(cli, built, tmp_path):
    root, _ = built
    r = cli("report", root / "analysis", root / "trace", root / "analysis" / "summary.json", "--out", tmp_path / "x")
    assert r.exit_code == 2
    assert "more than one summary in the inputs" in " ".join(r.stderr.split())
