"""index.html in a real headless browser (Debian's chromium): it loads from disk with no request
leaving the machine, every figure renders with a non-zero natural size, and a screenshot is taken
(kept under tests' tmp dir; set MOEPROF_SCREENSHOT=path to keep a copy)."""

from __future__ import annotations

import os
import shutil

import pytest
from browser import CHROMIUM, UNUSED, page_requests, probe
from report_data import analyze_to, synthetic_trace

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium chromium-driver; .ci/run installs it)",
)


def test_unused_preconnections_and_chromiums_housekeeping_are_not_the_pages_requests():
    seen = [UNUSED, "CONNECT update.googleapis.com:443 HTTP/1.1", "CONNECT cdn.example.org:443 HTTP/1.1",
            "GET http://example.org/x.js HTTP/1.1", "<connection without a request line>"]
    assert page_requests(seen) == seen[2:]


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    from moeprof.commands.main import main

    root = tmp_path_factory.mktemp("browser")
    trace = synthetic_trace(root / "trace")
    analysis = analyze_to(trace, root / "analysis")
    # the whole pipeline: simulate --compare writes compare.json and its figure; report picks both up
    compare = root / "compare"
    assert main(["simulate", str(trace), "--compare", "--nodes", "2", "--gpus-per-node", "2", "--out", str(compare)]) == 0
    assert main(["report", str(analysis), str(compare), "--out", str(root / "report")]) == 0
    return root, root / "report" / "index.html"


def test_page_loads_offline_and_every_figure_renders(report_page):
    root, page = report_page
    shot = root / "screenshot.png"
    result = probe(page, root, screenshot=shot)
    assert result["page_requests"] == [], f"the page tried to reach the network: {result['page_requests']}"
    assert result["resources"] == [], f"the page fetched {result['resources']}"
    assert result["sections"] == ["model", "imbalance", "domain", "prefill_decode", "coactivation", "placement"]
    imgs = result["imgs"]
    assert len(imgs) == 7  # analyze's six figures and simulate --compare's one
    for img in imgs:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, f"figure did not render: {img}"
        assert img["shown_w"] > 200, f"figure shown too small: {img}"
    # nothing overflows a laptop-width window sideways
    assert result["scroll_w"] <= 1280
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    keep = os.environ.get("MOEPROF_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_the_probe_sees_a_page_that_reaches_out(tmp_path):
    """The harness itself: a page with an external image and stylesheet is caught both ways."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="stylesheet" href="https://cdn.example.org/a.css"></head>'
        '<body><img src="http://example.com/x.png" alt="ext"></body></html>'
    )
    result = probe(page, tmp_path)
    assert sorted(result["resources"]) == ["http://example.com/x.png", "https://cdn.example.org/a.css"]
    assert "GET http://example.com/x.png HTTP/1.1" in result["page_requests"]
    assert "CONNECT cdn.example.org:443 HTTP/1.1" in result["page_requests"]
    assert result["imgs"] == [{"alt": "ext", "complete": True, "w": 0, "h": 0, "shown_w": result["imgs"][0]["shown_w"]}]
