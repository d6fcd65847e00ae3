"""Fault injection (issue 12): nothing deleted, nothing lost, nothing wrong in silence.

Each test injects one fault a user or a machine causes (a kill, an altered or cut shard, a full disk,
``--force`` on someone else's directory, a bad option) and asserts the exact outcome: what was
finished is still there and valid, nothing of the user's was deleted, and no number came out of a
corrupt input without an error.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from moeprof.trace import ModelInfo, Trace, TraceWriter

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


def flat(text: str) -> str:
    return " ".join(text.split())


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (hidden ones included) with its content: what "nothing changed" compares."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def moeprof(*args, check=False, timeout=300, **kw) -> subprocess.CompletedProcess:
    """``python -m moeprof ARGS`` in a child process (for kills and resource limits)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", COLUMNS="200", NO_COLOR="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "moeprof", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, check=check, **kw)


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    """A synthetic per-token trace of 3 routing shards (40 requests, 4 domains)."""
    from moeprof.synthetic import generate_trace

    out = tmp_path_factory.mktemp("faults") / "trace"
    generate_trace(out, num_requests=40, num_layers=3, num_experts=16, top_k=2, shard_rows=4000, seed=1)
    assert len(Trace.open(out).manifest.shards_of("routing")) >= 3
    return out


def copy_trace(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def write_jsonl(path: Path, tokens: int, *, requests: int = 50, layers: int = 4, experts: int = 16) -> Path:
    """A per-token routing JSONL log: ``tokens`` tokens × ``layers`` lines, top-2."""
    rng = np.random.default_rng(0)
    lines = [json.dumps({"model": "faults", "num_experts": experts, "top_k": 2})]
    e = rng.integers(0, experts, size=(tokens, layers, 2))
    for t in range(tokens):
        rid = f"r{t % requests}"
        phase = "prefill" if (t // requests) % 4 == 0 else "decode"
        for layer in range(layers):
            a, b = int(e[t, layer, 0]), int(e[t, layer, 1])
            lines.append(f'{{"req_id":"{rid}","token_idx":{t // requests},"layer":{layer},'
                         f'"topk_ids":[{a},{(a + 1 + b) % experts}],"phase":"{phase}"}}')
    path.write_text("\n".join(lines) + "\n")
    return path


# -- --force on directories moeprof did not write ---------------------------------------------------
def web_app(path: Path) -> Path:
    """A directory that is not moeprof's but holds a manifest.json and a summary.json."""
    path.mkdir(parents=True)
    (path / "index.html").write_text("<h1>my app</h1>")
    (path / "manifest.json").write_text('{"name": "my app"}')
    (path / "summary.json").write_text('{"mine": true}')
    (path / "data.csv").write_text("a,b\n1,2\n")
    return path


@pytest.mark.parametrize("command", ["import", "capture", "analyze", "demo"])
def test_force_refuses_a_directory_moeprof_did_not_write(cli, trace, tmp_path, command):
    app = web_app(tmp_path / "app")
    before = tree(app)
    args = {
        "import": lambda: ["import", "auto", write_jsonl(tmp_path / "r.jsonl", 20), "--out", app],
        "capture": lambda: ["capture", "--out", app],
        "analyze": lambda: ["analyze", trace, "--out", app],
        "demo": lambda: ["demo", "--out", app],
    }[command]()
    r = cli(*args, "--force")
    assert r.exit_code == 2
    assert flat(r.stderr).startswith(f"Error: {app / 'data.csv'}: not written by moeprof")
    assert "refusing to delete" in r.stderr
    assert tree(app) == before  # not one byte of the user's touched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["app"] + (["r.jsonl"] if command == "import" else []))


def test_force_refuses_a_moeprof_output_the_user_added_files_to(cli, trace, tmp_path):
    out = tmp_path / "a"
    assert cli("analyze", trace, "--out", out).exit_code == 0
    (out / "plots" / "my-notes.txt").write_text("keep me")
    r = cli("analyze", trace, "--out", out, "--force")
    assert r.exit_code == 2 and flat(r.stderr).startswith(f"Error: {out / 'plots' / 'my-notes.txt'}: not written by moeprof")
    assert (out / "plots" / "my-notes.txt").read_text() == "keep me"
    (out / "plots" / "my-notes.txt").unlink()
    assert cli("analyze", trace, "--out", out, "--force").exit_code == 0  # its own output: replaced


def test_force_replaces_moeprof_outputs(cli, trace, tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", 40)
    for _ in range(2):
        assert cli("import", "auto", src, "--out", tmp_path / "t", "--force").exit_code == 0
        assert cli("analyze", tmp_path / "t", "--out", tmp_path / "a", "--force").exit_code == 0
        assert cli("report", tmp_path / "t", "--out", tmp_path / "rep", "--force").exit_code == 0
        r = cli("diff", trace, tmp_path / "a", "--out", tmp_path / "d", "--force")
        assert r.exit_code == 0, r.stderr
    marker = json.loads((tmp_path / "a" / ".moeprof").read_text())
    assert marker["kind"] == "analysis" and "summary.json" in marker["files"]
    assert json.loads((tmp_path / "t" / ".moeprof").read_text())["kind"] == "trace"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    from moeprof.outputs import foreign_file

    for out in ("t", "a", "rep", "d"):
        assert foreign_file(tmp_path / out) is None, out  # all of it moeprof's: --force may replace it


def test_report_force_touches_only_its_own_files(cli, trace, tmp_path):
    out = tmp_path / "out"
    assert cli("analyze", trace, "--out", out / "analysis").exit_code == 0
    (out / "notes.md").write_text("mine")
    analysis = tree(out / "analysis")
    for _ in range(2):  # the first writes into a directory holding the user's files, the second replaces
        r = cli("report", out / "analysis", "--out", out, "--force")
        assert r.exit_code == 0, r.stderr
        assert tree(out / "analysis") == analysis  # its input, an analyze output, is left as it was
        assert (out / "notes.md").read_text() == "mine"
    assert (out / "index.html").exists()


def test_report_force_refuses_the_users_analysis_directory(cli, trace, tmp_path):
    out = tmp_path / "out"
    (out / "analysis").mkdir(parents=True)
    (out / "analysis" / "thesis.tex").write_text("years of work")
    r = cli("report", trace, "--out", out, "--force")  # a trace: the report would write out/analysis
    assert r.exit_code == 2
    assert flat(r.stderr).startswith(f"Error: {out / 'analysis' / 'thesis.tex'}: not written by moeprof")
    assert (out / "analysis" / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in out.iterdir()) == ["analysis"]


@pytest.mark.parametrize("command", ["place", "diff"])
def test_force_refuses_a_file_moeprof_did_not_write(cli, trace, tmp_path, command):
    target = tmp_path / ("placement.json" if command == "place" else "diff.json")
    target.write_text('{"mine": 1}')
    args = (["place", trace, "-n", "2", "-g", "2", "-p", "linear", "--out", target] if command == "place"
            else ["diff", trace, trace, "--out", tmp_path])
    r = cli(*args, "--force")
    assert r.exit_code == 2 and flat(r.stderr).startswith(f"Error: {target}: not written by moeprof")
    assert target.read_text() == '{"mine": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


# -- shards altered after they were written ---------------------------------------------------------
def flip_experts_byte(path: Path) -> int:
    """Flip one byte inside the ``experts`` column's data so that the file stays the same size and still
    parses, with different expert ids: the corruption a size or row check cannot see. Returns the offset."""
    meta = pq.ParquetFile(path).metadata
    col = meta.schema.names.index("experts") if "experts" in meta.schema.names else None
    cols = [meta.row_group(0).column(i) for i in range(meta.row_group(0).num_columns)]
    chunk = next(c for c in cols if c.path_in_schema.startswith("experts"))
    del col
    start = chunk.data_page_offset
    original = path.read_bytes()
    good = pq.read_table(path).column("experts").to_pylist()
    for offset in range(start + chunk.total_compressed_size - 1, start + 16, -1):
        data = bytearray(original)
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        try:
            changed = pq.read_table(path).column("experts").to_pylist() != good
        except Exception:  # noqa: BLE001 - this flip breaks the file: try the next byte
            continue
        if changed:
            return offset
    path.write_bytes(original)
    raise AssertionError(f"{path}: found no byte of the experts column that changes values silently")


READERS = {
    "analyze": lambda t, tmp: ["analyze", t, "--json"],
    "place": lambda t, tmp: ["place", t, "-n", "2", "-g", "2", "-p", "linear", "--out", tmp / "p.json"],
    "simulate": lambda t, tmp: ["simulate", t, "--compare", "-n", "2", "-g", "2", "--out", tmp / "cmp"],
    "report": lambda t, tmp: ["report", t, "--out", tmp / "rep"],
    "diff": lambda t, tmp: ["diff", t, t],
    "check": lambda t, tmp: ["check", t, "--max-imbalance", "100"],
}


@pytest.mark.parametrize("command", list(READERS))
def test_bit_flipped_shard_same_size_is_refused_by_every_reader(cli, trace, tmp_path, command):
    t = copy_trace(trace, tmp_path / "t")
    shard = t / Trace.open(t).manifest.shards_of("routing")[1].path
    size = shard.stat().st_size
    flip_experts_byte(shard)
    assert shard.stat().st_size == size
    r = cli(*READERS[command](t, tmp_path))
    assert r.exit_code == 2, r.stdout[-500:]
    assert flat(r.stderr).startswith(f"Error: {shard}: sha256 ")
    assert "differs from the manifest" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # and no output written


def test_bit_flipped_requests_file_is_refused(cli, trace, tmp_path):
    t = copy_trace(trace, tmp_path / "t")
    req = t / "requests.parquet"
    data = bytearray(req.read_bytes())
    data[len(data) // 3] ^= 0x04
    req.write_bytes(bytes(data))
    r = cli("analyze", t)
    assert r.exit_code == 2 and flat(r.stderr).startswith(f"Error: {req}: sha256 ")


@pytest.mark.parametrize("command", list(READERS))
def test_truncated_shard_is_refused_by_every_reader(cli, trace, tmp_path, command):
    t = copy_trace(trace, tmp_path / "t")
    shard = t / Trace.open(t).manifest.shards_of("routing")[0].path
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    r = cli(*READERS[command](t, tmp_path))
    assert r.exit_code == 2
    assert flat(r.stderr) == flat(
        f"Error: {shard}: {len(data) // 2} bytes on disk, the manifest says {len(data)}; the file was truncated or altered"
    )


def test_incomplete_trace_is_said_plainly(cli, tmp_path):
    model = ModelInfo(name="m", num_experts=4, top_k=2, moe_layers=[0])
    w = TraceWriter(tmp_path / "t", model=model, source="hf")
    w.set_request(0, "code", prompt_tokens=2)
    w.write_routing(dict(request_id=0, step=0, phase="prefill", pos=np.arange(2), layer=0, experts=[[0, 1], [2, 3]]))
    w.close(complete=False)
    r = cli("analyze", tmp_path / "t", "--out", tmp_path / "a")
    assert r.exit_code == 0
    assert "incomplete" in flat(r.stdout + r.stderr) and "2 rows it finished" in flat(r.stdout + r.stderr)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["trace"]["complete"] is False
    assert summary["warnings"] == [
        f"{tmp_path / 't'} is incomplete (manifest complete: false; the capture or import was interrupted): "
        "every statistic covers only the 2 rows it finished"
    ]
    r = cli("analyze", tmp_path / "t", "--json")
    assert json.loads(r.stdout)["warnings"] == summary["warnings"]


# -- failed imports leave nothing ------------------------------------------------------------------
def test_failed_import_leaves_nothing_and_the_next_needs_no_force(cli, tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", 30)
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(src.read_bytes()[:-25])  # the last line cut off
    r = cli("import", "auto", cut, "--out", tmp_path / "t")
    assert r.exit_code == 2 and "the file is cut off here" in r.stderr
    r = cli("import", "auto", src, "--top-k", "3", "--out", tmp_path / "t")
    assert r.exit_code == 2 and "inconsistent top-k" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.jsonl", "r.jsonl"]
    assert cli("import", "auto", src, "--out", tmp_path / "t").exit_code == 0


def test_failed_import_with_force_keeps_the_previous_trace(cli, tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", 30)
    assert cli("import", "auto", src, "--out", tmp_path / "t").exit_code == 0
    before = tree(tmp_path / "t")
    r = cli("import", "auto", src, "--top-k", "3", "--out", tmp_path / "t", "--force")
    assert r.exit_code == 2
    assert tree(tmp_path / "t") == before


def test_domain_map_matching_no_request_is_an_error(cli, tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", 30)
    (tmp_path / "d.csv").write_text("request_id,domain\nreq-1,code\nreq-2,math\n")
    r = cli("import", "auto", src, "--domains", tmp_path / "d.csv", "--out", tmp_path / "t")
    assert r.exit_code == 2
    assert flat(r.stderr) == flat(
        f"Error: --domains {tmp_path / 'd.csv'}: matches none of the 30 request ids of the source (e.g. 'r0'); "
        "check the map's keys"
    )
    assert not (tmp_path / "t").exists()


# -- processes killed mid-way ----------------------------------------------------------------------
def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before the kill point: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.005)


def _staging(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.moeprof-partial-*"))


@pytest.mark.parametrize("point", ["staging created", "first manifest written"])
def test_import_killed_leaves_the_previous_trace_and_no_partial_one(cli, tmp_path, point):
    small, big = write_jsonl(tmp_path / "small.jsonl", 20), write_jsonl(tmp_path / "big.jsonl", 30_000)
    assert cli("import", "auto", small, "--out", tmp_path / "t").exit_code == 0
    before = tree(tmp_path / "t")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen([sys.executable, "-m", "moeprof", "import", "auto", str(big), "--out",
                             str(tmp_path / "t"), "--force"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if point == "staging created":
        _wait_for(lambda: bool(_staging(tmp_path, "t")), proc)
    else:
        _wait_for(lambda: any((s / "manifest.json").exists() for s in _staging(tmp_path, "t")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tree(tmp_path / "t") == before  # the finished trace is untouched
    assert Trace.open(tmp_path / "t", verify="full").complete
    # The next import cleans what the killed one left and succeeds.
    assert cli("import", "auto", small, "--out", tmp_path / "t2").exit_code == 0
    assert cli("import", "auto", small, "--out", tmp_path / "t", "--force").exit_code == 0
    assert _staging(tmp_path, "t") == []


CAPTURE_SCRIPT = r"""
import sys
from moeprof.capture.run import load_pretrained
from moeprof.capture.session import capture

model, tok = load_pretrained(sys.argv[1], "cpu", "auto")
tok.padding_side = "left"
with capture(model, sys.argv[2], shard_rows=64) as rec:
    for i in range(100000):
        rec.new_request(domain="code")
        enc = tok(["def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)"], return_tensors="pt")
        model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id or 0)
        rec.flush()
"""


@pytest.mark.parametrize("shards_before_kill", [0, 3])
def test_capture_killed_keeps_every_finished_step(cli, tmp_path, shards_before_kill):
    pytest.importorskip("transformers")
    model = SAMPLE / "tiny-moe"
    if not (model / "config.json").exists():
        pytest.skip("sample_data/tiny-moe is not installed")
    out = tmp_path / "t"
    proc = subprocess.Popen([sys.executable, "-c", CAPTURE_SCRIPT, str(model), str(out)],
                            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def listed() -> list[dict]:
        try:
            return [s for s in json.loads((out / "manifest.json").read_text())["shards"] if s["kind"] == "routing"]
        except (OSError, ValueError):
            return []

    _wait_for(lambda: (out / "manifest.json").exists() and len(listed()) >= shards_before_kill, proc)
    seen = listed()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t = Trace.open(out, verify="full")  # every listed shard intact: no half-written file
    assert t.complete is False
    kept = {s.path: s.sha256 for s in t.manifest.shards_of("routing")}
    assert all(kept.get(s["path"]) == s["sha256"] for s in seen)  # nothing finished was lost
    r = cli("analyze", out)
    if t.num_routing_rows:
        assert r.exit_code == 0 and "incomplete" in flat(r.stdout + r.stderr)
    else:
        assert r.exit_code == 2 and "holds no routing rows" in r.stderr


# -- a disk that fills -----------------------------------------------------------------------------
def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_import_on_a_full_disk_leaves_nothing(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", 4_000)
    r = moeprof("import", "auto", src, "--out", tmp_path / "t", preexec_fn=_file_size_limit(10_000))
    assert r.returncode == 2, r.stderr
    assert f"Error: writing {tmp_path / 't'}" in flat(r.stderr)
    assert "File too large" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


def test_analyze_on_a_full_disk_leaves_nothing_and_keeps_the_old_output(cli, trace, tmp_path):
    assert cli("analyze", trace, "--out", tmp_path / "a").exit_code == 0
    before = tree(tmp_path / "a")
    r = moeprof("analyze", trace, "--out", tmp_path / "a", "--force", preexec_fn=_file_size_limit(20_000))
    assert r.returncode == 2, r.stderr
    assert f"Error: {tmp_path / 'a'}: writing failed (File too large" in flat(r.stderr)
    assert "nothing was written" in r.stderr and "Traceback" not in r.stderr
    assert tree(tmp_path / "a") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# -- user mistakes that reach the operating system, and options out of range -----------------------
def test_os_mistakes_are_messages_checked_before_work(cli, trace, tmp_path):
    (tmp_path / "prompts").mkdir()
    r = cli("capture", "--prompts", tmp_path / "prompts", "--out", tmp_path / "t")
    assert r.exit_code == 2
    assert flat(r.stderr) == flat(f"Error: {tmp_path / 'prompts'}: is a directory; give the workload JSONL file "
                                  "(one prompt per line)")
    (tmp_path / "file").write_text("x")
    r = cli("capture", "--out", tmp_path / "file" / "t")  # the parent is a file: refused before the model loads
    assert r.exit_code == 2 and flat(r.stderr) == flat(f"Error: --out {tmp_path / 'file' / 't'}: {tmp_path / 'file'} is not a directory")
    r = cli("analyze", trace / "manifest.json")
    assert r.exit_code == 2
    assert flat(r.stderr) == flat(f"Error: {trace / 'manifest.json'}: is a file; give the trace directory "
                                  f"(the one holding manifest.json), here {trace}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "prompts"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_output_location_is_a_message(cli, trace, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for args in (["analyze", trace, "--out", ro / "a"], ["capture", "--out", ro / "t"]):
            r = cli(*args)
            assert r.exit_code == 2 and "cannot write in" in r.stderr and "Permission denied" in r.stderr
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("args, message", [
    (["analyze", "{trace}", "--sample-tokens", "0"], "Invalid value for '--sample-tokens'"),
    (["analyze", "{trace}", "--seed", "-1"], "Invalid value for '--seed'"),
    (["demo", "--limit", "0", "--out", "{tmp}/d"], "Invalid value for '--limit'"),
    (["capture", "--limit", "0", "--out", "{tmp}/t"], "Invalid value for '--limit'"),
    (["capture", "--batch-size", "0", "--out", "{tmp}/t"], "Invalid value for '--batch-size'"),
    (["capture", "--max-new-tokens", "0", "--out", "{tmp}/t"], "Invalid value for '--max-new-tokens'"),
    (["place", "{trace}", "-n", "2", "-g", "2", "-p", "locality", "--load-bound", "0.5", "--out", "{tmp}/p.json"],
     "Invalid value for '--load-bound'"),
    (["place", "{trace}", "-n", "2", "-g", "2", "-p", "linear", "--seed", "-1", "--out", "{tmp}/p.json"],
     "Invalid value for '--seed'"),
    (["place", "{trace}", "-n", "0", "-g", "2", "-p", "linear", "--out", "{tmp}/p.json"], "--nodes must be at least 1"),
    (["place", "{trace}", "-n", "2", "-g", "2", "-p", "linear", "--test-fraction", "1", "--out", "{tmp}/p.json"],
     "--test-fraction must be between 0 and 1"),
    (["simulate", "{trace}", "--compare", "-n", "2", "-g", "2", "--batch-size", "0", "--out", "{tmp}/c"],
     "--batch-size must be at least 1"),
    (["check", "{trace}", "--max-imbalance", "2", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["check", "{trace}", "--max-domain-js", "2"], "--max-domain-js: 2 is out of range: domain_js takes values from 0 to 1"),
    (["check", "{trace}", "--max-dead-experts", "-1"], "--max-dead-experts: -1 is out of range"),
    (["check", "{trace}", "--max-imbalance", "0.5"], "--max-imbalance: 0.5 is out of range: imbalance takes values from 1 and up"),
    (["import", "auto", "{trace}/manifest.json", "--top-k", "0", "--out", "{tmp}/t"], "Invalid value for '--top-k'"),
])
def test_option_out_of_range_is_an_error_naming_it(cli, trace, tmp_path, args, message):
    r = cli(*[a.format(trace=trace, tmp=tmp_path) for a in args])
    assert r.exit_code == 2
    assert message in flat(r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_locality_load_bound_below_one_is_refused_by_the_library():
    from moeprof.errors import PlacementError
    from moeprof.placement.policies import locality

    with pytest.raises(PlacementError, match=r"--load-bound must be at least 1.0 .* got 0.5"):
        locality(None, load_bound=0.5)  # checked before anything of the fit input is read


def test_each_shard_is_read_once_and_hashed_as_it_is_parsed(trace, monkeypatch):
    """Verification costs no second pass: analyze reads every shard's bytes exactly once."""
    from moeprof.analysis.run import analyze_trace

    reads: list[Path] = []
    real = Trace.shard_bytes

    def counted(self, path):
        reads.append(Path(path))
        return real(self, path)

    monkeypatch.setattr(Trace, "shard_bytes", counted)
    analyze_trace(trace, threads=4)
    files = [trace / s.path for s in Trace.open(trace).manifest.shards]
    assert sorted(reads) == sorted(files)
