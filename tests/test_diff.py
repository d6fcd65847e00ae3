"""`moeprof diff`: known answers on hand-built traces, exact exit codes and messages."""

from __future__ import annotations

import json
import math

import pytest
from report_data import analyze_to, hand_trace


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    a = hand_trace(root / "a")
    b = hand_trace(root / "b", swap03=True)
    return a, b, analyze_to(a, root / "a-analysis")


def _js_by_hand() -> float:
    p = [0.625, 0.125, 0.125, 0.125]
    q = p[::-1]
    m = [(x + y) / 2 for x, y in zip(p, q)]
    kl = lambda a: sum(x * math.log2(x / z) for x, z in zip(a, m))  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_known_answer_two_traces(cli, runs):
    a, b, _ = runs
    r = cli("diff", a, b, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    l0, l1 = doc["layers"]
    assert l0["layer"] == 0 and l0["js"] == pytest.approx(_js_by_hand(), abs=1e-12)
    assert (l0["imbalance_a"], l0["imbalance_b"], l0["imbalance_change"]) == (2.5, 2.5, 0.0)
    assert (l0["hot_appeared"], l0["hot_vanished"]) == ([3], [0])
    assert (l1["js"], l1["imbalance_a"], l1["hot_appeared"], l1["hot_vanished"]) == (0.0, 1.0, [], [])
    assert doc["only_a"] == doc["only_b"] == []


def test_summary_against_trace_and_identical_runs(cli, runs):
    a, b, a_analysis = runs
    r = cli("diff", a_analysis, a)
    assert r.exit_code == 0, r.stderr
    assert "Expert popularity is identical in every layer; imbalance is unchanged in every layer." in _flat(r.stdout)
    r = cli("diff", a_analysis / "summary.json", b, "--json")
    assert json.loads(r.stdout)["layers"][0]["js"] == pytest.approx(_js_by_hand(), abs=1e-12)


def test_max_js_gate_is_exit_1_naming_the_layer(cli, runs):
    a, b, _ = runs
    r = cli("diff", a, b, "--max-js", "0.1")
    assert r.exit_code == 1
    assert r.stdout.rstrip().splitlines()[-1] == "1 layer exceeds --max-js 0.1: layer 0 (0.2625)"
    assert "Routing moved most in layer 0 (JS divergence 0.262; 1 hot expert appeared, 1 vanished)" in _flat(r.stdout)
    r = cli("diff", a, b, "--max-js", "0.3")
    assert r.exit_code == 0
    assert r.stdout.rstrip().splitlines()[-1] == "Every layer is within --max-js 0.3."


def test_out_writes_json_and_figure_and_refuses_to_overwrite(cli, runs, tmp_path):
    a, b, _ = runs
    out = tmp_path / "d"
    r = cli("diff", a, b, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "diff.json").read_text())["layers"][0]["hot_appeared"] == [3]
    png = (out / "diff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "diff.svg").read_text().lstrip().startswith("<?xml")
    r = cli("diff", a, b, "--out", out)
    assert r.exit_code == 2
    assert _flat(r.stderr) == _flat(f"Error: {out / 'diff.json'}: exists; pass --force to replace it")
    assert cli("diff", a, b, "--out", out, "--force").exit_code == 0


def test_different_models_and_bad_inputs_are_exit_2(cli, runs, tmp_path):
    a, _, _ = runs
    wide = hand_trace(tmp_path / "wide", num_experts=8)
    r = cli("diff", a, wide)
    assert r.exit_code == 2
    assert _flat(r.stderr) == _flat(
        f"Error: {a} has 4 experts per layer and {wide} has 8: expert popularity can only be compared between "
        "runs of the same model"
    )
    r = cli("diff", a, tmp_path / "nothing")
    assert r.exit_code == 2
    assert _flat(r.stderr) == _flat(
        f"Error: {tmp_path / 'nothing'}: neither a trace (manifest.json) nor an analyze output (summary.json)"
    )
