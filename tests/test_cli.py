"""Every subcommand has help with an example; errors are messages, never tracebacks."""

from __future__ import annotations

import pytest

from moeprof.commands.main import COMMANDS, app


def _registered() -> list[str]:
    return [c.name for c in app.registered_commands]


def test_every_command_in_the_registry_is_registered():
    assert _registered() == [name for name in COMMANDS if name in _registered()]
    assert "inspect" in _registered()


@pytest.mark.parametrize("name", _registered())
def test_help_has_text_and_an_example(cli, name):
    r = cli(name, "--help")
    assert r.exit_code == 0, r.stderr
    assert "Example" in r.stdout, f"`moeprof {name} --help` shows no example"
    assert "moeprof " + name in r.stdout


def test_top_level_help_and_version(cli):
    r = cli("--help")
    assert r.exit_code == 0 and "inspect" in r.stdout
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith("moeprof ")


def test_unknown_command_is_a_usage_error(cli):
    r = cli("frobnicate")
    assert r.exit_code == 2
    assert "No such command" in r.stderr


def test_analysis_commands_need_no_torch_and_capture_says_how_to_get_it(tmp_path):
    """An analysis-only install has no torch or transformers: every other command still works."""
    import os
    import subprocess
    import sys

    from moeprof.synthetic import generate_trace

    trace = tmp_path / "t"
    generate_trace(trace, num_requests=8, num_layers=2, num_experts=8, top_k=2, seed=1)
    # Stand-ins that fail to import, first on the path: as if neither package were installed.
    fake = tmp_path / "site"
    for name in ("torch", "transformers"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\")\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), *sys.path]))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "moeprof", *map(str, args)], capture_output=True, text=True, env=env)

    r = run("analyze", trace, "--json")
    assert r.returncode == 0, r.stderr
    r = run("capture", "--out", tmp_path / "cap")
    assert r.returncode == 2
    assert "capture needs torch and transformers" in r.stderr and "Traceback" not in r.stderr
    assert "pip install 'moeprof[capture]'" in r.stderr.replace("\n", " ")


def test_help_prose_is_reflowed_for_any_terminal_width():
    from moeprof.commands.main import reflow

    doc = '''Summary line.

        A paragraph wrapped
        in the source, with --options.

        - an item that
          goes on
        - another item

        Examples:

            moeprof analyze trace --out a
            moeprof analyze trace --out b
        '''
    assert reflow(doc) == (
        "Summary line.\n\nA paragraph wrapped in the source, with --options.\n\n"
        "- an item that goes on\n- another item\n\nExamples:\n\n"
        "    moeprof analyze trace --out a\n    moeprof analyze trace --out b"
    )
