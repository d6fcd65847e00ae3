"""docs/ci-example.yml and docs/rules.example.toml pass out of the box on the shipped model.

The workflow's steps run as written, in a scratch directory holding the repository's docs/, except
two: the install (the test runs inside an installed moeprof) and the capture, replaced by a copy of
sample_data/trace, which is that capture (`moeprof capture` of the sample workload on the shipped
tiny model, greedy, 32 new tokens).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "docs" / "ci-example.yml"


def workflow_steps(text: str) -> list[tuple[str, str]]:
    """(name, run script) of each step with a ``run:``, in order (block scalars and one-liners)."""
    steps, name = [], None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"\s*- name:\s*(.+)", line):
            name = m.group(1).strip()
        if m := re.match(r"(\s*)run:\s*(.*)", line):
            indent, rest = len(m.group(1)), m.group(2).strip()
            if rest == "|":
                body = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    body.append(lines[i].strip())
                    i += 1
                steps.append((name, "\n".join(body).strip()))
                continue
            steps.append((name, rest))
        i += 1
    return steps


def test_the_workflow_parses_into_its_steps():
    names = [n for n, _ in workflow_steps(WORKFLOW.read_text())]
    assert names[0].startswith("Install") and names[1] == "Capture routing on the workload"
    assert names[-1] == "Gate on routing limits"


def test_ci_example_passes_on_the_shipped_model(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    (tmp_path / "out").mkdir()
    shutil.copytree(ROOT / "sample_data" / "trace", tmp_path / "out" / "trace")
    summary = tmp_path / "step_summary.md"
    env = dict(os.environ, GITHUB_STEP_SUMMARY=str(summary), NO_COLOR="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("COLUMNS", None)
    ran = []
    for name, script in workflow_steps(WORKFLOW.read_text()):
        if name.startswith("Install") or name.startswith("Capture"):
            continue
        r = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert r.returncode == 0, f"step {name!r} failed ({r.returncode}):\n{r.stdout}"
        ran.append((name, r.stdout))
    assert [n for n, _ in ran] == ["Analyze", "Report", "Job summary", "Gate on routing limits"]
    gate = ran[-1][1]
    assert "All 8 rules hold." in gate and "FAIL" not in gate
    assert "docs/rules.example.toml:" in gate  # the "from" column names file:line, whole, in a log
    assert "### Findings" in summary.read_text()
