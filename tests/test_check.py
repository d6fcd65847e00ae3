"""`moeprof check` on real analyze output: exact exit codes and messages."""

from __future__ import annotations

import json

import pytest
from report_data import analyze_to, hand_trace


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    trace = hand_trace(root / "trace")
    return trace, analyze_to(trace, root / "analysis")


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_rule_holds_is_exit_0(cli, hand):
    _, analysis = hand
    r = cli("check", analysis, "--max-imbalance", "2.5", "--max-dead-experts", "0")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.rstrip().endswith("All 2 rules hold.")
    assert "FAIL" not in r.stdout


def test_a_value_over_its_limit_is_exit_1_with_value_limit_and_layer(cli, hand):
    _, analysis = hand
    r = cli("check", analysis / "summary.json", "--max-imbalance", "2.4", "--max-dead-experts", "0")
    assert r.exit_code == 1
    lines = r.stdout.rstrip().splitlines()
    # layer 0 is 20/8 = 2.5 (hand-counted); layer 1 is 1.0 and passes
    assert lines[-2:] == ["1 of 2 rules failed:", "  imbalance at layer 0: 2.5 > max 2.4 (--max-imbalance)"]


def test_rules_file_failures_name_the_rule_line(cli, hand, tmp_path):
    _, analysis = hand
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\nmetric = "imbalance"\nmax = 3\n\n'
        '[[rule]]\nname = "balanced layer 1"\nmetric = "imbalance"\nmax = 1.2\nlayers = [0, 1]\n\n'
        '[[rule]]\nmetric = "entropy"\nmin = 0.9\n'
    )
    r = cli("check", analysis, "--rules", rules)
    assert r.exit_code == 1
    fails = _flat(r.stdout).split("rules failed: ", 1)[1]
    assert fails == _flat(
        f"balanced layer 1 at layer 0: 2.5 > max 1.2 ({rules}:5) "
        f"entropy at layer 0: 0.7744 < min 0.9 ({rules}:11)"
    )
    assert "2 of 3 rules failed:" in r.stdout


def test_json_output_lists_failures(cli, hand):
    _, analysis = hand
    r = cli("check", analysis, "--max-imbalance", "2", "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    assert doc["failures"] == [{
        "rule": "imbalance", "origin": "--max-imbalance", "value": 2.5, "limit": 2.0, "side": "max", "layer": 0,
        "message": "imbalance at layer 0: 2.5 > max 2 (--max-imbalance)",
    }]


def test_a_trace_is_analysed_on_the_fly(cli, hand):
    trace, _ = hand
    r = cli("check", trace, "--max-imbalance", "2.4")
    assert r.exit_code == 1
    assert "imbalance at layer 0: 2.5 > max 2.4 (--max-imbalance)" in r.stdout


def test_a_trace_analysed_on_the_fly_leaves_nothing_in_the_temporary_directory(cli, hand, tmp_path, monkeypatch):
    """The analysis `check TRACE` makes goes to a temporary directory, removed when the check is done
    (each run left one behind)."""
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    trace, _ = hand
    for limit in ("2.4", "9"):
        r = cli("check", trace, "--max-imbalance", limit)
        assert r.exit_code in (0, 1), r.stdout + r.stderr
        assert list(temp.iterdir()) == []


def test_metric_the_inputs_lack_is_exit_2(cli, hand):
    _, analysis = hand
    r = cli("check", analysis, "--max-cross-node-bytes", "1000")
    assert r.exit_code == 2
    assert _flat(r.stderr) == _flat(
        "Error: --max-cross-node-bytes: cannot check 'cross_node_bytes': no placement or simulate --compare "
        "result among the inputs"
    )
    # analyze's own reason comes through when it could not compute a statistic
    rules = analysis.parent / "acc.toml"
    rules.write_text('[[rule]]\nmetric = "domain_accuracy"\nmin = 0.9\n')
    r = cli("check", analysis, "--rules", rules)
    assert r.exit_code == 2
    assert _flat(r.stderr).startswith(_flat(f"Error: {rules}:1: cannot check 'domain_accuracy': needs at least two domains"))


def test_unknown_layer_and_missing_batch_size_are_exit_2(cli, hand, tmp_path):
    _, analysis = hand
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nmetric = "imbalance"\nmax = 3\nlayers = [7]\n')
    r = cli("check", analysis, "--rules", rules)
    assert r.exit_code == 2
    assert _flat(r.stderr) == _flat(f"Error: {rules}:1: layers [7] have no 'imbalance' value; layers with one: [0, 1]")
    r = cli("check", analysis, "--max-imbalance", "3", "--batch-size", "100")
    assert r.exit_code == 2
    assert _flat(r.stderr) == _flat(
        "Error: --max-imbalance: cannot check 'imbalance (batch_size=100, stat=p90)': analyze computed no batch "
        "size 100 (it has [1, 8, 64]; see analyze --batch-sizes)"
    )


def test_not_an_input_is_exit_2(cli, tmp_path):
    r = cli("check", tmp_path, "--max-imbalance", "3")
    assert r.exit_code == 2
    assert _flat(r.stderr).startswith(_flat(f"Error: {tmp_path}: not a trace, an analyze output (summary.json)"))


def test_summary_of_another_format_is_exit_2(cli, hand, tmp_path):
    _, analysis = hand
    doc = json.loads((analysis / "summary.json").read_text())
    doc["summary_format"] = "9.0"
    bad = tmp_path / "summary.json"
    bad.write_text(json.dumps(doc))
    r = cli("check", bad, "--max-imbalance", "3")
    assert r.exit_code == 2
    assert _flat(r.stderr) == _flat(
        f"Error: {bad}: summary format 9.0, this moeprof reads format 1.0; re-run `moeprof analyze` with this version"
    )
    doc["summary_format"] = "1.0"
    del doc["imbalance"]["per_layer"]
    bad.write_text(json.dumps(doc))
    r = cli("check", bad, "--max-imbalance", "3")
    assert r.exit_code == 2
    assert _flat(r.stderr).startswith(_flat(f"Error: {bad}: not a valid analyze summary at imbalance:"))
