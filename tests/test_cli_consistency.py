"""Every command reads the same way: help text with an example, defaults that survive rich, one
meaning per short flag, --json, and a start-up that imports no heavy library."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from moeprof.commands import options
from moeprof.commands.main import COMMANDS, app


def _commands():
    import typer

    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in COMMANDS}


def _flat(text: str) -> str:
    """Help as rich draws it, boxes and wrapping removed: words separated by single spaces."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help_and_an_example(name):
    cmd = _commands()[name]
    assert cmd.help and len(cmd.help.split(".")[0]) > 10, f"moeprof {name} has no help text"
    parts = re.split(r"Examples?:", cmd.help, maxsplit=1)
    assert len(parts) == 2 and f"moeprof {name}" in parts[1], f"moeprof {name}'s help has no example"
    for p in cmd.params:
        if getattr(p, "hidden", False) or p.name in {"help"}:
            continue
        assert getattr(p, "help", None), f"moeprof {name}: {p.opts} has no help text"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_keeps_every_word_of_each_option_and_its_default(name, cli):
    """rich reads "[default: ...]" written in a help string as a markup tag and drops it."""
    r = cli(name, "--help")
    assert r.exit_code == 0
    shown = _flat(r.stdout)
    for p in _commands()[name].params:
        if getattr(p, "hidden", False) or not getattr(p, "help", None):
            continue
        words = _flat(p.help)
        assert words in shown, f"moeprof {name} --help lost part of {p.opts[0]}'s help: {words!r}"
        if p.param_type_name == "option" and not p.is_flag and p.show_default is not False:
            if p.default not in (None, [], ()) and not p.required:
                assert re.search(r"\[default: [^\]]+\]", shown), f"{name}: no default shown"


def test_defaults_written_in_help_text_are_shown(cli):
    shown = _flat(cli("place", "--help").stdout)
    for text in ("Expert slots per GPU per layer (default: ceil(E / GPUs)).",
                 "(default: the trace's model)", "(default: 1.1 × eplb's)"):
        assert text in shown
    assert "(default: 256)" in _flat(cli("simulate", "--help").stdout)


def test_one_meaning_per_short_flag():
    meaning: dict[str, set[str]] = {}
    for name, cmd in _commands().items():
        for p in cmd.params:
            longs = [o for o in p.opts if o.startswith("--")]
            for short in (o for o in p.opts + p.secondary_opts if re.fullmatch(r"-[A-Za-z]", o)):
                meaning.setdefault(short, set()).update(f"{lo}" for lo in longs)
    clashes = {s: m for s, m in meaning.items() if len(m) > 1}
    assert not clashes, f"short flags with two meanings: {clashes}"
    assert meaning["-n"] == {"--nodes"} and meaning["-o"] == {"--out"}


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "demo"])
def test_json_everywhere(name):
    opts = {o for p in _commands()[name].params for o in p.opts}
    assert "--json" in opts, f"moeprof {name} has no --json"


def test_analyze_format_json_still_works_with_a_note(cli, tmp_path):
    from moeprof.synthetic import generate_trace

    generate_trace(tmp_path / "t", num_requests=8, seed=1)
    trace = tmp_path / "t"
    new = cli("analyze", trace, "--json", "--batch-sizes", "1")
    old = cli("analyze", trace, "--format", "json", "--batch-sizes", "1")
    assert new.exit_code == old.exit_code == 0
    assert json.loads(new.stdout)["trace"] == json.loads(old.stdout)["trace"]
    assert "--format is deprecated; use --json" in old.stderr and "deprecated" not in new.stderr


def test_choice_lists_match_the_library_registries():
    from moeprof.analysis.run import DEFAULT_BATCH_SIZES
    from moeprof.importers import FORMATS
    from moeprof.placement.export import EXPORTERS
    from moeprof.placement.grouping import GROUPINGS
    from moeprof.placement.policies import POLICIES

    assert options.POLICY_NAMES == tuple(POLICIES)
    assert options.GROUPING_NAMES == tuple(GROUPINGS)
    assert options.EXPORTER_NAMES == tuple(EXPORTERS)
    assert options.IMPORT_FORMATS == tuple(FORMATS)
    assert options.DEFAULT_BATCH_SIZES == tuple(DEFAULT_BATCH_SIZES)


HEAVY = ("matplotlib", "scipy", "polars", "pyarrow", "numpy", "torch", "moeprof.analysis", "moeprof.placement")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["analyze", "--help"], ["simulate", "--help"],
                                  ["place", "--help"], ["check", "--help"]])
def test_start_up_imports_no_heavy_library(argv):
    """What makes `moeprof --help` take 2 s: every subcommand's library imported up front."""
    code = (f"import sys; from moeprof.commands.main import main; code = main({argv!r}); "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m in {HEAVY!r}), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    loaded = r.stderr.strip().splitlines()[-1]
    assert loaded == "[]", f"moeprof {' '.join(argv)} imported {loaded}"


def test_analysis_never_imports_the_report_layer():
    code = ("import sys, moeprof.analysis.run, moeprof.analysis.aggregate, moeprof.analysis.domain, "
            "moeprof.analysis.load, moeprof.analysis.phase, moeprof.analysis.coactivation; "
            "print([m for m in sys.modules if m.startswith('moeprof.report')])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stderr


def _hook_log(path):
    with open(path, "w") as f:
        for rid in (1, 2):
            for t in range(3):
                for layer in (0, 1):
                    f.write(json.dumps({"req_id": rid, "token_idx": t, "layer": layer, "topk_ids": [t % 4, (t + 1) % 4],
                                        "phase": "prefill" if t < 2 else "decode"}) + "\n")
    return path


def test_requests_without_a_domain_are_unlabelled_in_import_as_in_capture(cli, tmp_path):
    from moeprof.capture.session import DEFAULT_DOMAIN
    from moeprof.trace.reader import Trace
    from moeprof.trace.schema import UNLABELLED

    assert DEFAULT_DOMAIN == UNLABELLED == "unlabelled"
    r = cli("import", "jsonl", _hook_log(tmp_path / "r.jsonl"), "--num-experts", "4", "--out", tmp_path / "t")
    assert r.exit_code == 0, r.stderr
    assert Trace.open(tmp_path / "t").requests()["domain"].to_list() == ["unlabelled", "unlabelled"]


def test_old_imported_traces_that_say_unknown_read_as_unlabelled(cli, tmp_path):
    """Imports before this change wrote "unknown"; rewrite one shard that way (size and checksum kept
    consistent through the manifest) and read it back."""
    import hashlib

    import polars as pl

    from moeprof.trace.reader import Trace

    cli("import", "jsonl", _hook_log(tmp_path / "r.jsonl"), "--num-experts", "4", "--out", tmp_path / "t")
    req = tmp_path / "t" / "requests.parquet"
    old = pl.read_parquet(req).with_columns(pl.lit("unknown").alias("domain"))
    old.write_parquet(req)
    manifest_path = tmp_path / "t" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for shard in manifest["shards"]:
        if shard["path"] == "requests.parquet":
            shard["bytes"] = req.stat().st_size
            shard["sha256"] = hashlib.sha256(req.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    t = Trace.open(tmp_path / "t", verify="full")
    assert t.requests()["domain"].to_list() == ["unlabelled", "unlabelled"]
    assert pl.read_parquet(req)["domain"].to_list() == ["unknown", "unknown"]  # the file itself is untouched


def test_no_analysis_module_names_the_report_layer():
    from pathlib import Path

    import moeprof.analysis

    for path in Path(moeprof.analysis.__file__).parent.glob("*.py"):
        code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        assert not any(re.search(r"(from|import)\s+moeprof\.report", line) for line in code), path


def test_analyze_without_out_draws_nothing(tmp_path):
    """Figures are drawn by the report layer for an output directory only."""
    from moeprof.synthetic import generate_trace

    generate_trace(tmp_path / "t", num_requests=8, seed=1)
    code = ("import sys; from moeprof.commands.main import main; "
            f"code = main(['analyze', {str(tmp_path / 't')!r}, '--json', '--batch-sizes', '1']); "
            "print('matplotlib' in sys.modules, file=sys.stderr); sys.exit(code)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "False"
