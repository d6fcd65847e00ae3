"""Tables stay readable in a CI log: stdout is a pipe, COLUMNS is unset, and rich would otherwise
wrap every table at 80 columns ("grou…", a rules file:line cut in two)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def moeprof_in_a_log(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES", "FORCE_COLOR"}}
    env.update(NO_COLOR="1", TERM="dumb")
    code = "import sys; from moeprof.commands.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    from moeprof.synthetic import generate_trace

    out = tmp_path_factory.mktemp("log") / "trace"
    generate_trace(out, num_requests=40, seed=3)
    return out


def test_compare_table_headers_are_whole_in_a_log(trace, tmp_path):
    r = moeprof_in_a_log("simulate", trace, "--compare", "-n", "2", "-g", "2", "--out", tmp_path / "cmp", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    header = "\n".join(r.stdout.splitlines()[:8])
    for word in ("policy", "grouping", "cross-node", "KiB/token", "vs", "eplb", "intra-node", "own", "node", "GPU",
                 "GPU load", "max/mean", "p90", "fit"):
        assert word in header, f"header {word!r} is not whole in:\n{header}"
    for policy in ("round_robin", "locality+domain"):
        assert policy in r.stdout


def test_check_names_the_rules_file_line_whole_in_a_log(trace, tmp_path):
    deep = tmp_path / "a-rather-long-directory-name" / "ci-config" / "routing-limits"
    deep.mkdir(parents=True)
    rules = deep / "moeprof-routing-rules.toml"
    rules.write_text('[[rule]]\nmetric = "imbalance"\nmax = 1.01\n\n[[rule]]\nmetric = "dead_experts"\nmax = 100\n')
    r = moeprof_in_a_log("check", trace, "--rules", rules, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert f"{rules}:1" in r.stdout and f"{rules}:5" in r.stdout
    table = [line for line in r.stdout.splitlines() if "FAIL" in line or " ok " in line]
    assert len(table) == 2 and all(str(rules) in line for line in table)  # one line per rule, not wrapped
