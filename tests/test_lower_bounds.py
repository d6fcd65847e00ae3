"""`.ci/lower-bounds.txt` pins exactly pyproject.toml's lower bounds, so the oldest-versions CI job
(`.ci/lower-bounds.sh`) tests what the project admits and the two files cannot drift apart."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def _pins() -> dict[str, Version]:
    pins = {}
    for n, line in enumerate((ROOT / ".ci" / "lower-bounds.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f".ci/lower-bounds.txt line {n}: expected NAME==VERSION, got {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_dependency_has_one_lower_bound_pinned_in_the_ci_constraints():
    pins = _pins()
    for req in _requirements():
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"pyproject.toml: {req} needs exactly one >= lower bound (tested by CI)"
        name = canonicalize_name(req.name)
        assert name in pins, f".ci/lower-bounds.txt has no pin for {req.name} (pyproject.toml: {req})"
        assert pins[name] == Version(lower[0]), (
            f"{req.name}: pyproject.toml admits >={lower[0]} but .ci/lower-bounds.txt tests =={pins[name]}"
        )


def test_the_ci_constraints_pin_nothing_that_pyproject_does_not_declare():
    declared = {canonicalize_name(r.name) for r in _requirements()}
    stale = sorted(set(_pins()) - declared)
    assert not stale, f".ci/lower-bounds.txt pins {stale}, which pyproject.toml does not declare"
