"""`moeprof check` rules files: every mistake is exit 2 with file:line and what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moeprof.report.rules import METRICS, load_rules

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "rules.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rules.toml"
    p.write_text(text)
    return p


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_documented_example_parses(tmp_path):
    rules = load_rules(EXAMPLE)
    assert [r.metric for r in rules] == ["imbalance", "imbalance", "dead_experts", "gini", "entropy", "domain_js",
                                         "domain_accuracy", "prefill_decode_corr"]
    assert rules[1].params == {"batch_size": 64, "stat": "p90"}
    assert rules[1].max == 8.0 and rules[1].label() == "imbalance at batch 64 (p90)"
    assert rules[7].min == 0.5 and rules[7].layers == [0, 1, 2, 3]
    # origins point at the [[rule]] header line of each rule
    lines = EXAMPLE.read_text().splitlines()
    for r in rules:
        n = int(r.origin.rsplit(":", 1)[1])
        assert lines[n - 1].strip() == "[[rule]]"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[[rule]]\nmetric = "imbalance"\nmax = 4\n\n[[rule]]\nmetric = "imbalanse"\nmax = 3\n',
            "rules.toml:6: unknown metric 'imbalanse'; known metrics: " + ", ".join(METRICS),
        ),
        (
            '[[rule]]\nmetric = "imbalance"\nmax = 4\nbatchsize = 64\n',
            "rules.toml:4: unknown key 'batchsize' for metric 'imbalance'; allowed: batch_size, layers, max, "
            "metric, min, name, stat",
        ),
        ('[[rule]]\nmetric = "imbalance"\n', "rules.toml:2: rule on 'imbalance' has neither 'max' nor 'min'"),
        ('[[rule]]\nmax = 4\n', "rules.toml:1: [[rule]] without 'metric'; one of: " + ", ".join(METRICS)),
        ('[[rule]]\nmetric = "imbalance"\nmax = "four"\n', "rules.toml:3: 'max' must be a finite number, got 'four'"),
        (
            '[[rule]]\nmetric = "imbalance"\nmax = 4\nstat = "p99"\n',
            "rules.toml:4: stat must be 'median' or 'p90', got 'p99'",
        ),
        ('[[rule]]\nmetric = "imbalance"\nmax = 4\nlayers = 3\n',
         "rules.toml:4: 'layers' must be a list of layer numbers, got 3"),
        ('[[rule]]\nmetric = "imbalance"\nmax = 4 4\n', "rules.toml:3: not valid TOML: "),
        ('[limits]\nimbalance = 4\n',
         "rules.toml:1: unknown table or key 'limits'; a rules file holds only [[rule]] tables"),
        ('# nothing\n', "rules.toml: no [[rule]] table; see `moeprof check --help` for the format"),
    ],
)
def test_bad_rules_file_is_exit_2_with_file_and_line(cli, tmp_path, text, message):
    rules = _write(tmp_path, text)
    r = cli("check", tmp_path, "--rules", rules)
    assert r.exit_code == 2
    assert r.stdout == ""
    # rich wraps long lines on stderr: compare with whitespace collapsed
    assert _flat(r.stderr).startswith(_flat(f"Error: {tmp_path}/{message}"))
    assert "Traceback" not in r.stderr


def test_missing_rules_file(cli, tmp_path):
    r = cli("check", tmp_path, "--rules", tmp_path / "nope.toml")
    assert r.exit_code == 2
    assert r.stderr.strip() == f"Error: {tmp_path / 'nope.toml'}: rules file not found"


def test_no_rules_at_all(cli, tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "rules.toml")
    r = cli("check", tmp_path)
    assert r.exit_code == 2
    assert r.stderr.strip() == "Error: no rules to check: give --rules FILE or a limit such as --max-imbalance 4"


def test_the_readme_rules_example_parses(tmp_path):
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    block = readme.split("<!-- section: report -->", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    rules = load_rules(_write(tmp_path, block))
    assert [r.metric for r in rules] == ["imbalance", "imbalance", "prefill_decode_corr", "cross_node_bytes"]
    assert rules[3].params == {"policy": "locality"}


def test_ci_example_runs_the_three_steps_and_gates_last():
    yaml = pytest.importorskip("yaml")  # transformers (the capture extra) brings pyyaml

    doc = yaml.safe_load((EXAMPLE.parent / "ci-example.yml").read_text())
    steps = doc["jobs"]["routing"]["steps"]
    runs = [s.get("run", "") for s in steps]
    text = "\n".join(runs)
    assert text.index("pip install torch==2.13.0") < text.index("pip install -e '.[capture]'")
    for cmd in ("moeprof capture", "moeprof analyze", "moeprof report", "GITHUB_STEP_SUMMARY"):
        assert cmd in text
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in steps)
    assert runs[-1].startswith("moeprof check ") and "--rules docs/rules.example.toml" in runs[-1]
