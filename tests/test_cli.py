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
