"""What a demanding new user tried on place, simulate, check and diff, and what broke before.

Each test is one input a user can hand moeprof (an absurd cluster, a hand-edited placement.json, a rules
file with a key of the wrong type, a gate that can never fail) and asserts the one-shot message and
exit code 2 it must get, instead of the traceback, the silent pass or the wrong number it got before.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeprof.trace import ModelInfo, TraceWriter

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TRACE = REPO / "sample_data" / "trace"


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    """A synthetic per-token trace: 40 requests, 3 MoE layers × 16 experts, top-2."""
    from moeprof.synthetic import generate_trace

    out = tmp_path_factory.mktemp("probes") / "trace"
    generate_trace(out, num_requests=40, num_layers=3, num_experts=16, top_k=2, seed=1)
    return out


@pytest.fixture(scope="module")
def placement(trace, tmp_path_factory) -> dict:
    """placement.json of the locality policy (prefill grouping) on 2 nodes × 2 GPUs, as a dict."""
    from moeprof.commands.main import main

    out = tmp_path_factory.mktemp("placement") / "placement.json"
    assert main(["place", str(trace), "-n", "2", "-g", "2", "-p", "locality", "--out", str(out)]) == 0
    return json.loads(out.read_text())


# -- cluster shapes no machine holds ----------------------------------------------------------------
@pytest.mark.parametrize("shape, total", [
    (["-n", "99999999999", "-g", "2"], "199,999,999,998"),
    (["-n", "1", "-g", "1", "--redundant", "1000000"], "1,000,016"),
    (["-n", "2", "-g", "2", "--slots-per-gpu", "100000000000000000000"], "400,000,000,000,000,000,000"),
])
@pytest.mark.parametrize("command", ["place", "simulate"])
def test_a_cluster_too_big_to_simulate_is_refused_by_name(cli, trace, tmp_path, shape, total, command):
    args = (["place", trace, "-p", "eplb", "--out", tmp_path / "p.json"] if command == "place"
            else ["simulate", trace, "--compare", "--out", tmp_path / "c"])
    r = cli(*args, *shape)
    assert r.exit_code == 2, r.stderr
    assert f"= {total} expert slots per layer; moeprof simulates at most 65,536" in flat(r.stderr)
    assert "check --nodes, --gpus-per-node, --slots-per-gpu and --redundant" in flat(r.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS bounds the address space on Linux")
def test_running_out_of_memory_is_a_message_not_a_traceback(tmp_path):
    # 1024 nodes × 8 GPUs is under the slot cap but needs GiBs for this trace: numpy's MemoryError.
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    env = dict(os.environ, NO_COLOR="1", COLUMNS="200", POLARS_MAX_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "moeprof", "place", str(SAMPLE_TRACE), "-n", "1024", "-g", "8",
                        "-p", "eplb", "--out", str(tmp_path / "p.json")],
                       capture_output=True, text=True, env=env, preexec_fn=limit, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert flat(r.stderr).startswith("Error: out of memory (Unable to allocate")
    assert "--sample-requests, --sample-rows or a smaller cluster" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_infinite_load_bound_is_refused_not_written_as_bare_infinity(cli, trace, tmp_path):
    r = cli("place", trace, "-n", "2", "-g", "2", "-p", "locality", "--load-bound", "inf", "--out", tmp_path / "p.json")
    assert r.exit_code == 2
    assert flat(r.stderr) == ("Error: --load-bound must be finite, got inf; for a bound that never binds give a "
                              "large one, such as 1000")
    assert list(tmp_path.iterdir()) == []


# -- placement.json edited by hand, cut or replaced -------------------------------------------------
def _ragged(d):
    d["physical_to_logical_map"][0].pop()


def _cluster_node_outside(d):
    d["grouping"]["cluster_nodes"][0] = [7]


def _grouping_nodes(d):
    d["grouping"]["nodes"] = 5


def _centroid_width(d):
    d["grouping"]["centroids"] = [[1.0], [0.5]]


def _no_cluster_nodes(d):
    d["grouping"]["cluster_nodes"] = []


def _replica_count(d):
    d["logical_replica_count"][1][0] += 2


def _log2phy(d):
    d["logical_to_physical_map"][0][0][0] = 63


@pytest.mark.parametrize("edit, message", [
    (_ragged, "physical_to_logical_map: rows of [15, 16] slots; every layer needs the same"),
    (_cluster_node_outside, "grouping/cluster_nodes: nodes [7] outside 0..1"),
    (_grouping_nodes, "grouping/nodes is 5, the topology has 2 nodes"),
    (_centroid_width, "grouping/centroids: expected rows of 48 finite numbers (MoE layers × experts), got shape (2, 1)"),
    (_no_cluster_nodes, "grouping/cluster_nodes: expected one non-empty list of nodes per centroid (2), got []"),
    (_replica_count, "logical_replica_count does not match physical_to_logical_map (the map moeprof reads)"),
    (_log2phy, "logical_to_physical_map does not match physical_to_logical_map (the map moeprof reads)"),
])
def test_a_hand_edited_placement_is_refused_naming_the_field(cli, trace, placement, tmp_path, edit, message):
    d = copy.deepcopy(placement)
    edit(d)
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(d))
    r = cli("simulate", trace, "--placement", path)
    assert r.exit_code == 2, r.stderr
    assert flat(r.stderr).startswith(f"Error: {path}: {message}")


def test_a_binary_placement_file_is_refused(cli, trace, tmp_path):
    path = tmp_path / "placement.json"
    path.write_bytes(bytes(range(256)))
    r = cli("simulate", trace, "--placement", path)
    assert r.exit_code == 2
    assert flat(r.stderr).startswith(f"Error: {path}: not JSON ('utf-8' codec can't decode byte 0x80")


# -- check: rules that could not fail, or that crashed ----------------------------------------------
@pytest.fixture(scope="module")
def analysis(trace, tmp_path_factory) -> Path:
    from moeprof.commands.main import main

    out = tmp_path_factory.mktemp("analysis") / "a"
    assert main(["analyze", str(trace), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("body, message", [
    ('[[rule]]\nname = 3\nmetric = "imbalance"\nmax = 9\n', "rules.toml:2: 'name' must be a string, got 3"),
    ('[[rule]]\nmetric = "imbalance"\nmax = 9\nlayers = []\n',
     "rules.toml:4: 'layers' is empty; name at least one MoE layer, or leave 'layers' out"),
    ('[[rule]]\nmetric = "imbalance"\nstat = "p90"\nmax = 9\n',
     "rules.toml:3: 'stat' needs 'batch_size' (median or p90 over batches of that size)"),
    ('[[rule]]\nmetric = "imbalance"\nmax = 2\nmin = 5\n', "rules.toml:4: min 5 is above max 2: no value can hold"),
])
def test_a_rule_that_cannot_mean_what_it_says_is_refused(cli, analysis, tmp_path, body, message):
    rules = tmp_path / "rules.toml"
    rules.write_text(body)
    r = cli("check", analysis, "--rules", rules)
    assert r.exit_code == 2, r.stdout
    assert flat(r.stderr) == flat(f"Error: {tmp_path}/{message}")


def test_a_rules_file_with_a_byte_order_mark_is_read(cli, analysis, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_bytes(b'\xef\xbb\xbf[[rule]]\nmetric = "imbalance"\nmax = 1000\n')  # as Notepad saves UTF-8
    r = cli("check", analysis, "--rules", rules)
    assert r.exit_code == 0, r.stderr
    assert "All 1 rules hold." in r.stdout


def test_a_rule_whose_every_value_is_undefined_does_not_pass(cli, tmp_path):
    # Every token picks all 4 experts: prefill and decode counts are constant, their correlation NaN in
    # every layer. The rule checked nothing, and `check` used to say "All 1 rules hold."
    model = ModelInfo(name="flat", architecture="hand-built", num_experts=4, top_k=4, moe_layers=[0, 1],
                      num_layers=2, hidden_size=8, dtype="bfloat16")
    with TraceWriter(tmp_path / "t", model=model, source="synthetic") as w:
        for r, domain in ((0, "a"), (1, "b")):
            w.set_request(r, domain, prompt_tokens=8, decode_tokens=8)
            pos = np.arange(16)
            step = np.where(pos < 8, 0, pos - 7).astype(np.int32)
            for layer in (0, 1):
                w.write_routing(dict(request_id=r, step=step, phase=(step > 0).astype(np.int8), pos=pos, layer=layer,
                                     experts=np.tile(np.arange(4), (16, 1)), weights=None,
                                     batch_id=step.astype(np.int64)))
    r = cli("check", tmp_path / "t", "--min-prefill-decode-corr", "0.5")
    assert r.exit_code == 2, r.stdout
    assert flat(r.stderr) == ("Error: --min-prefill-decode-corr: cannot check 'prefill_decode_corr': all 2 of its "
                              "values are undefined (NaN)")


# -- diff: gates that could never fail, inputs that are not summaries -------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1.5"])
def test_diff_max_js_outside_0_to_1_is_refused(cli, analysis, value):
    r = cli("diff", analysis, analysis, "--max-js", value)
    assert r.exit_code == 2
    assert flat(r.stderr) == f"Error: --max-js: {float(value)} is out of range: JS divergence takes values from 0 to 1"
    assert r.stdout == ""


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)), "not a text file; is it a moeprof analyze summary?"),
    (b"[1, 2]", "a JSON list, not the object of a moeprof analyze summary"),
    (b'{"physical_to_logical_map": []}', "not a summary.json of `moeprof analyze` (it has no summary_format)"),
])
def test_diff_against_a_file_that_is_no_summary(cli, analysis, tmp_path, content, message):
    path = tmp_path / "summary.json"
    path.write_bytes(content)
    r = cli("diff", analysis, path)
    assert r.exit_code == 2
    assert flat(r.stderr) == f"Error: {path}: {message}"


def test_report_and_check_on_a_binary_json_name_it(cli, tmp_path):
    path = tmp_path / "results.json"
    path.write_bytes(bytes(range(256)))
    for args in (["report", path, "--out", tmp_path / "r"], ["check", path, "--max-imbalance", "3"]):
        r = cli(*args)
        assert r.exit_code == 2
        assert flat(r.stderr).startswith(f"Error: {path}: not a trace, an analyze output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# -- --out that is the directory the user stands in -------------------------------------------------
def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("out", [".", "{cwd}", ".."])
def test_analyze_out_the_current_directory_is_refused_before_work(cli, trace, tmp_path, monkeypatch, out):
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    out = out.format(cwd=here)
    r = cli("analyze", trace, "--out", out, "--force")
    assert r.exit_code == 2, r.stderr
    assert flat(r.stderr).startswith(f"Error: --out {out}: is the current directory")
    assert "replaces it whole: give a new one, such as --out" in flat(r.stderr)
    assert "reading routing" not in r.stderr  # refused before the trace was read
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["here", "work"]


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> Path:
    """A capture of the embedded default (2 prompts), made outside the repository."""
    from moeprof.commands.main import main

    out = tmp_path_factory.mktemp("captured") / "t"
    assert main(["capture", "--out", str(out), "--limit", "2"]) == 0
    return out


def test_capture_force_into_the_current_directory_keeps_the_trace_there(cli, captured, tmp_path, monkeypatch):
    # Before: the earlier capture in `.` was deleted, then `rmdir .` failed: "cannot write (Invalid argument)".
    import shutil

    shutil.copytree(captured, tmp_path / "t")
    before = tree(tmp_path / "t")
    monkeypatch.chdir(tmp_path / "t")
    r = cli("capture", "--out", ".", "--limit", "2", "--force")
    assert r.exit_code == 2
    assert flat(r.stderr).startswith("Error: --out .: is the current directory")
    assert tree(tmp_path / "t") == before


def test_timeline_of_an_embedded_default_capture_works_outside_the_repository(cli, captured, tmp_path, monkeypatch):
    # The manifest names the model "sample_data/tiny-moe"; its config.json was only found from the repo root.
    monkeypatch.chdir(tmp_path)
    r = cli("simulate", captured, "--timeline", "-n", "2", "-g", "2", "--policies", "linear,eplb", "--out", "tl")
    assert r.exit_code == 0, r.stderr
    assert "note: moe_intermediate_size 96 from " in r.stdout
    assert (tmp_path / "tl" / "timeline.json").is_file()


# -- simulate: options of another mode were ignored without a word ----------------------------------
@pytest.mark.parametrize("mode, extra, message", [
    (["--compare", "-n", "2", "-g", "2"], ["--policies", "eplb"],
     "--policies does not apply to simulate --compare (it is not read there); leave it out"),
    (["--compare", "-n", "2", "-g", "2"], ["--gpu", "h200"],
     "--gpu does not apply to simulate --compare (it is not read there); leave it out"),
    (["--placement", "{placement}"], ["-n", "4"],
     "--nodes does not apply to simulate --placement (the placement file fixes the topology and the split); "
     "leave it out"),
    (["--placement", "{placement}"], ["--out", "{tmp}/x"],
     "--out does not apply to simulate --placement (it writes no file; --json prints the result); leave it out"),
    (["--timeline", "-n", "2", "-g", "2"], ["--batch-size", "8"],
     "--batch-size does not apply to simulate --timeline (it is not read there); leave it out"),
])
def test_simulate_refuses_an_option_its_mode_does_not_read(cli, trace, placement, tmp_path, monkeypatch, mode, extra,
                                                          message):
    monkeypatch.chdir(tmp_path)  # where --compare and --timeline would write by default
    (tmp_path / "p.json").write_text(json.dumps(placement))
    args = [a.format(placement=tmp_path / "p.json", tmp=tmp_path) for a in mode + extra]
    r = cli("simulate", trace, *args)
    assert r.exit_code == 2, r.stdout
    assert flat(r.stderr) == f"Error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


# -- Ctrl-C -------------------------------------------------------------------------------------------
def _children(pid: int) -> list[str]:
    return subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()


def _session(sid: int) -> list[tuple[int, int, str, str]]:
    """The processes of session ``sid``: (pid, parent pid, state, command line), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            args = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited meanwhile
            continue
        state, ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
        if int(session) == sid:
            found.append((int(entry), int(ppid), state, args.strip()))
    return found


def _running_in_session(sid: int, wait_s: float) -> list[tuple[int, int, str, str]]:
    """The processes of session ``sid`` still running after up to ``wait_s`` seconds. A zombie has
    exited: one whose parent exited first waits for init to collect it, which some containers' init
    does late or never, and is none of moeprof's doing."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        running = [p for p in _session(sid) if p[2] != "Z"]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.1)


@pytest.mark.skipif(sys.platform != "linux", reason="process groups and pgrep as on Linux")
def test_ctrl_c_in_analyze_says_aborted_once_with_no_traceback_and_no_process_left(tmp_path, python_ctrl_c):
    # A terminal's Ctrl-C goes to the whole process group: moeprof and its figure workers. Before, each
    # worker printed a KeyboardInterrupt traceback, and moeprof itself exited 130 without a word.
    import shutil
    import signal
    import time

    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    # The Ctrl-C goes a moment after the first worker starts (it ignores SIGINT once started). On an idle
    # machine the whole command can end within 0.3 s of that: an attempt that ran to the end (exit 0, its
    # output written) is tried again with a shorter wait; one that ignored the Ctrl-C does so every time.
    for wait in (0.3, 0.1, 0.05):
        p = subprocess.Popen([sys.executable, "-m", "moeprof", "analyze", str(SAMPLE_TRACE), "--out", str(tmp_path / "a")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while not _children(p.pid) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if not _children(p.pid):
            p.kill()
            p.communicate()
            pytest.skip("no figure worker was started (figures drawn in the process on a busy machine)")
        time.sleep(wait)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=120)
        left = _running_in_session(p.pid, wait_s=10)
        if p.returncode != 0 or not (tmp_path / "a").exists():
            break
        shutil.rmtree(tmp_path / "a")  # moeprof's own output of this test, written before the Ctrl-C
    assert p.returncode == 130, (p.returncode, err, _session(p.pid))
    # No Python traceback. A Rust library's own panic report (pyo3 prints it from its panic hook, on one
    # line that quotes the KeyboardInterrupt's traceback) is none of moeprof's: the command still says
    # Aborted. and exits 130 (tests/test_user_faults.py).
    lines = err.splitlines()
    assert not any(x.startswith(("Traceback", "KeyboardInterrupt", "Exception ignored")) for x in lines), err
    assert err.strip().splitlines()[-1] == "Aborted."
    assert err.count("Aborted.") == 1
    assert left == [], _session(p.pid)  # (pid, parent, state, command line) of each
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_ctrl_c_in_code_run_from_a_string_still_exits_130_under_python_m(tmp_path):
    # A Ctrl-C that lands while exec/eval runs a string (a dataclass's generated __init__ being defined)
    # makes CPython mark the interrupt unhandled even once caught, and `python -m` then ended the process
    # by SIGINT (-2) after "Aborted.": 3 runs of about 390 of the test above, found by polling that mark.
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import sys\n"
        "if __name__ == '__main__':\n"
        "    import moeprof.analysis.run as run\n"
        "    run.analyze = lambda *a, **k: exec('raise KeyboardInterrupt')\n"
        "    from moeprof.commands.main import main\n"
        "    sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    res = subprocess.run([sys.executable, "-m", "interrupted_in_exec", "analyze", str(SAMPLE_TRACE), "--out",
                          str(tmp_path / "a"), "--figures", "none"], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 130, (res.returncode, res.stderr)
    assert res.stderr.strip().splitlines()[-1] == "Aborted." and "Traceback" not in res.stderr


def test_demo_says_a_step_was_interrupted_not_failed(cli, tmp_path, monkeypatch):
    import moeprof.commands.main as main_mod

    def step(argv):  # capture and inspect done, Ctrl-C during analyze, which says so as main does
        if argv[0] != "analyze":
            return 0
        return main_mod._aborted()  # as main says it

    monkeypatch.setattr(main_mod, "main", step)
    r = cli("demo", "--out", tmp_path / "d")
    assert r.exit_code == 130
    assert "step 3 (analyze) was interrupted; the demo stops here" in r.stdout
    assert r.stderr.count("Aborted.") == 1  # the step's; the demo's own main said it again


# -- two writers, one --out -------------------------------------------------------------------------
HOLD_WRITER = """
import sys
from moeprof.trace import ModelInfo, TraceWriter
model = ModelInfo(name="x", architecture="hand-built", num_experts=4, top_k=1, moe_layers=[0], num_layers=1,
                  hidden_size=8, dtype="bfloat16")
w = TraceWriter(sys.argv[1], model=model, source="synthetic")
print("ready", flush=True)
sys.stdin.read()  # writing, until the test closes stdin
w.close()
"""


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_capture_into_a_trace_another_process_is_writing_is_refused(cli, tmp_path):
    # Before: both captures checked the directory, wrote into it together and both said they succeeded,
    # the trace of one lost under the other's.
    out = tmp_path / "t"
    writer = subprocess.Popen([sys.executable, "-c", HOLD_WRITER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        before = {p.name for p in out.iterdir()}
        r = cli("capture", "--out", out, "--limit", "2", "--force")
        assert r.exit_code == 2
        assert flat(r.stderr) == (f"Error: {out}: another moeprof process is writing it now; wait for it to finish "
                                  "or choose another --out")
        assert {p.name for p in out.iterdir()} == before
    finally:
        writer.communicate("", timeout=60)
    assert writer.returncode == 0
    # Once that writer closed, the directory is free again.
    from moeprof.trace import ModelInfo, TraceWriter

    model = ModelInfo(name="y", architecture="hand-built", num_experts=4, top_k=1, moe_layers=[0], num_layers=1,
                      hidden_size=8, dtype="bfloat16")
    TraceWriter(out, model=model, source="synthetic", force=True).close()


@pytest.mark.parametrize("figures, written", [
    ("none", "summary.json, {out}/tables/*.parquet"),
    ("png", "summary.json, {out}/tables/*.parquet, {out}/plots/*.png"),
])
def test_analyze_says_only_the_files_it_wrote(cli, trace, tmp_path, figures, written):
    out = tmp_path / "a"
    r = cli("analyze", trace, "--out", out, "--figures", figures)
    assert r.exit_code == 0, r.stderr
    assert flat(r.stdout).endswith(f"wrote {out}/" + written.format(out=out))
    assert (out / "plots").exists() == (figures != "none")


def test_compare_on_a_decode_only_trace_skips_what_needs_prefill(cli, tmp_path):
    # Logs of generated tokens only (the gpt-oss set in ../shared/realdata is one): --compare failed
    # outright on locality+domain, leaving the user no comparison at all.
    rng = np.random.default_rng(0)
    model = ModelInfo(name="decode-only", architecture="hand-built", num_experts=8, top_k=2, moe_layers=[0, 1],
                      num_layers=2, hidden_size=8, dtype="bfloat16")
    with TraceWriter(tmp_path / "t", model=model, source="synthetic") as w:
        for r in range(40):
            w.set_request(r, "ab"[r % 2], prompt_tokens=0, decode_tokens=12)
            step = np.arange(1, 13, dtype=np.int32)
            for layer in (0, 1):
                first = rng.integers(0, 8, 12)
                experts = np.stack([first, (first + 1 + rng.integers(0, 7, 12)) % 8], 1)
                w.write_routing(dict(request_id=r, step=step, phase=np.ones(12, np.int8), pos=step, layer=layer,
                                     experts=experts, weights=None, batch_id=step.astype(np.int64)))
    r = cli("simulate", tmp_path / "t", "--compare", "-n", "2", "-g", "2", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.stderr
    assert "locality+domain: skipped, locality fits on prefill routing and the trace has no prefill rows" in flat(r.stdout)
    rows = json.loads((tmp_path / "c" / "compare.json").read_text())["rows"]
    assert [row["key"] for row in rows] == ["linear", "round_robin", "eplb"]


# -- outputs that cannot be written: named as the user gave them, said before the work ---------------
def test_place_names_its_out_file_when_the_place_cannot_be_written(cli, trace, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "p.json"
    r = cli("place", trace, "-n", "2", "-g", "2", "-p", "eplb", "--out", out)
    assert r.exit_code == 2
    assert flat(r.stderr) == f"Error: --out {out}: {tmp_path / 'file'} is not a directory"


def test_timeline_says_its_out_cannot_be_written_before_the_replay(cli, trace, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "tl"
    r = cli("simulate", trace, "--timeline", "-n", "2", "-g", "2", "--moe-intermediate-size", "64", "--out", out)
    assert r.exit_code == 2
    assert flat(r.stderr) == f"Error: --out {out}: {tmp_path / 'file'} is not a directory"
    assert r.stdout == ""  # no replay was run and printed


def test_demo_into_another_moeprof_output_is_refused_even_with_force(cli, tmp_path):
    """It wrote its steps' folders inside the trace (nothing deleted, but a trace with a demo in it)."""
    from moeprof.synthetic import generate_trace

    trace = tmp_path / "t"
    generate_trace(trace, num_requests=4, seed=1)
    before = sorted(p.name for p in trace.iterdir())
    r = cli("demo", "--out", trace, "--force")
    assert r.exit_code == 2 and "holds a moeprof trace, not a demo" in flat(r.stderr)
    assert sorted(p.name for p in trace.iterdir()) == before
