"""Known answers for the expert-selection importer and for warm-up judged per forward pass."""

from __future__ import annotations

import json

import pytest

import import_fixtures as fx
from moeprof.errors import ImportFormatError
from moeprof.importers import ImportOptions, detect, import_trace
from moeprof.importers.base import WARMUP_IDENTICAL
from moeprof.importers.expert_selection import common_tag
from moeprof.importers.warmup import WARMUP_SIGNATURE, WarmupDetector, pass_starts
from moeprof.trace.reader import Trace

import numpy as np


def _rows(trace_dir):
    t = Trace.open(trace_dir)
    req = t.requests()
    dom = dict(zip(req["request_id"].to_list(), req["domain"].to_list()))
    out = []
    for b in t.routing_batches():
        d = b.to_pydict()
        for i in range(b.num_rows):
            out.append((dom[d["request_id"][i]], d["step"][i], str(d["phase"][i]), d["pos"][i], d["layer"][i],
                        d["experts"][i]))
    return sorted(out)


@pytest.mark.parametrize("tar", [False, True])
def test_expert_selection_rows_phases_and_domains(tmp_path, tar):
    src = fx.expert_selection(tmp_path / "src", tar=tar)
    assert detect(src) == "expert-selection"
    rep = import_trace("auto", [src], tmp_path / "t")
    assert rep.format == "expert-selection" and rep.requests == 2
    assert rep.routing_rows == (3 + 1 + 1) * 2 + (2 + 1) * 2
    rows = _rows(tmp_path / "t")
    # the shared "tag-" prefix of the directory names is stripped
    assert [r for r in rows if r[0] == "code"] == [
        ("code", 0, "prefill", 0, 1, [0, 1]), ("code", 0, "prefill", 0, 3, [4, 5]),
        ("code", 0, "prefill", 1, 1, [2, 3]), ("code", 0, "prefill", 1, 3, [6, 7]),
        ("code", 1, "decode", 2, 1, [3, 2]), ("code", 1, "decode", 2, 3, [5, 4]),
    ]
    math = [r for r in rows if r[0] == "math"]
    assert [(s, ph, p) for _, s, ph, p, lay, _ in math if lay == 3] == [
        (0, "prefill", 0), (0, "prefill", 1), (0, "prefill", 2), (1, "decode", 3), (2, "decode", 4)]
    m = Trace.open(tmp_path / "t").manifest
    assert m.model.moe_layers == [1, 3] and m.model.num_layers == 2 + 0 + 1  # three keys, one dense
    assert m.model.top_k == 2 and m.model.num_experts == 8
    assert {"weights", "token_id", "batch_id"} <= set(m.missing)
    t = Trace.open(tmp_path / "t").requests()
    assert sorted(zip(t["domain"].to_list(), t["prompt_tokens"].to_list(), t["decode_tokens"].to_list())) == [
        ("code", 2, 1), ("math", 3, 2)]


def test_expert_selection_domains_map_overrides_directories(tmp_path):
    src = fx.expert_selection(tmp_path / "src")
    (tmp_path / "d.csv").write_text("request_id,domain\ntag-math/0,algebra\n")
    import_trace("expert-selection", [src], tmp_path / "t", ImportOptions(domains=tmp_path / "d.csv"))
    assert sorted({r[0] for r in _rows(tmp_path / "t")}) == ["algebra", "unlabelled"]


def test_common_tag_only_strips_a_dash_prefix_shared_by_several_directories():
    assert common_tag(["llama4-mmlu-anatomy", "llama4-mmlu-astronomy"]) == "llama4-mmlu-"
    assert common_tag(["high_school_biology", "high_school_chemistry"]) == ""
    assert common_tag(["llama4-mmlu-anatomy"]) == ""
    assert common_tag(["a-b", "a-b-c"]) == "a-"
    assert common_tag(["x-", "x-y"]) == ""  # stripping would leave one name empty


def test_expert_selection_bad_step_names_file_and_step(tmp_path):
    root = tmp_path / "src" / "x"
    root.mkdir(parents=True)
    (root / "1.json").write_text(json.dumps([{"1": [[1, 2], [3, 4]], "3": [[1, 2]]}]))
    with pytest.raises(ImportFormatError, match=r"1\.json: step 0, layer 3: 1 tokens here but 2"):
        import_trace("expert-selection", [tmp_path / "src"], tmp_path / "t")
    assert not (tmp_path / "t" / "manifest.json").exists()


def test_a_directory_is_refused_by_formats_that_read_files(tmp_path):
    src = fx.expert_selection(tmp_path / "src")
    with pytest.raises(ImportFormatError, match="is a directory"):
        import_trace("jsonl", [src], tmp_path / "t")


# -- warm-up per forward pass ------------------------------------------------------------------------
def test_pass_starts_token_major_and_layer_major():
    # token-major: t0 L0, t0 L1, t1 L0, t1 L1 | t0 L0 ...
    pos, lay = np.array([0, 0, 1, 1, 0, 0]), np.array([0, 1, 0, 1, 0, 1])
    assert pass_starts(pos, lay, {}) == [4]
    # layer-major: L0 t0 t1, L1 t0 t1 | L0 t0 ...
    pos, lay = np.array([0, 1, 0, 1, 0, 1, 0]), np.array([0, 0, 1, 1, 0, 0, 1])
    assert pass_starts(pos, lay, {}) == [4]
    state = {}
    assert pass_starts(np.array([0, 1]), np.array([0, 0]), state) == []
    assert pass_starts(np.array([0]), np.array([0]), state) == [0]  # carried over from the last call


def test_detector_identical_then_signature_then_real():
    det = WarmupDetector()
    lay4 = np.zeros(4, dtype=np.int64)
    same = np.tile([[3, 1]], (4, 1))
    assert det.judge(lay4, same, np.tile([[0.6, 0.4]], (4, 1))) == WARMUP_IDENTICAL
    # a 2-token pass routed like the dummy one, before any real pass: CUDA-graph capture
    assert det.judge(np.zeros(2, dtype=np.int64), same[:2]) == WARMUP_SIGNATURE
    real = np.array([[3, 1], [2, 0], [5, 4], [1, 3]])
    assert det.judge(lay4, real) is None
    # after the first real pass a short pass is never judged by signature
    assert det.judge(np.zeros(2, dtype=np.int64), same[:2]) is None
    # identical ids but different weights: real tokens, not a dummy input
    assert WarmupDetector().judge(lay4, same, np.array([[0.6, 0.4], [0.7, 0.3], [0.6, 0.4], [0.6, 0.4]])) is None


def test_jsonl_dummy_passes_under_a_real_request_id(tmp_path):
    """The vLLM-MoE-Logger's shape: one req_id for everything, token_idx restarting every pass."""
    lines = [{"type": "meta", "model_id": "m", "top_k": 2}]
    w = [0.75, 0.25]
    for n in (6, 2):  # profiling pass, then a CUDA-graph capture pass
        lines += [{"req_id": "r1", "token_idx": t, "layer": 0, "topk_ids": [4, 1], "topk_weights": w} for t in range(n)]
    real = [[0, 1], [2, 3], [5, 6], [7, 0], [1, 2]]
    lines += [{"req_id": "r1", "token_idx": t, "layer": 0, "topk_ids": e, "topk_weights": w} for t, e in enumerate(real)]
    lines += [{"req_id": "r1", "token_idx": t, "layer": 0, "topk_ids": [4, 1], "topk_weights": w} for t in range(2)]
    src = tmp_path / "log.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rep = import_trace("jsonl", [src], tmp_path / "t", ImportOptions(drop_warmup=True))
    # the 6-token pass is identical; the 2-token one matches its signature before real traffic; the
    # last 2-token pass comes after real traffic and is kept
    assert rep.warmup == {WARMUP_IDENTICAL: 6, WARMUP_SIGNATURE: 2}
    assert rep.routing_rows == 7
    kept = import_trace("jsonl", [src], tmp_path / "u")
    assert kept.routing_rows == 15 and kept.warmup == rep.warmup


def _pass_starts_row_by_row(pos, layer, last):
    """The definition, one row at a time."""
    starts = []
    for i, (p, lay) in enumerate(zip(pos.tolist(), layer.tolist())):
        prev = last.get(lay)
        if prev is not None and p <= prev:
            starts.append(i)
            last.clear()
        last[lay] = p
    return starts


@pytest.mark.parametrize("seed", range(40))
def test_pass_starts_equal_the_row_by_row_definition(seed):
    rng = np.random.default_rng(seed)
    fast, slow = {}, {}
    for _ in range(4):  # calls for one unit carry their state
        n = int(rng.integers(0, 60))
        layers = int(rng.integers(1, 5))
        if rng.random() < 0.5:  # passes of token-major rows, token indices restarting
            toks = np.concatenate([np.arange(int(rng.integers(1, 6))) for _ in range(n // 3 + 1)])
            pos, lay = np.repeat(toks, layers)[:n], np.tile(np.arange(layers), toks.size)[:n]
        else:  # anything
            pos, lay = rng.integers(-2, 6, n), rng.integers(0, layers, n)
        assert pass_starts(pos, lay, fast) == _pass_starts_row_by_row(pos, lay, slow)
        assert fast == slow


@pytest.mark.parametrize("ids", [[5, 5, -1, -1, 7, 5, 0], [2**62 + 1, 2**62 + 1, -(2**63), 3, 3, 3, -1]])
def test_rows_per_request_and_phase_counted_for_every_id(ids):
    from collections import Counter

    from moeprof.importers.run import _Requests

    rid, phase = np.array(ids, np.int64), np.array([0, 1, 0, 1, 1, 1, 0], np.int8)
    reqs = _Requests(None)
    reqs.count(rid, phase)
    reqs.count(rid[:3], phase[:3])
    reqs.count(rid[:2], phase[:2])  # one request's rows
    reqs.count(rid[2:4], phase[2:4])
    want: dict[int, list[int]] = {}
    seen = Counter(zip(ids, phase.tolist())) + Counter(zip(ids[:3], phase[:3].tolist()))
    seen += Counter(zip(ids[:2], phase[:2].tolist())) + Counter(zip(ids[2:4], phase[2:4].tolist()))
    for (r, p), c in seen.items():
        want.setdefault(r, [0, 0])[p] += c
    assert reqs.rows == want


def test_expert_selection_steps_with_and_without_null_layers_give_every_row(tmp_path):
    # steps read whole (no null layer), layer by layer (a null layer), and with no tokens at all
    rng = np.random.default_rng(3)
    steps = []
    for i in range(40):
        n = int(rng.integers(0, 4)) if i else 3
        step = {str(lay): rng.integers(0, 8, (n, 2)).tolist() for lay in (1, 2, 3)}
        if rng.random() < 0.4:
            step["0"] = None
        steps.append(step)
    src = tmp_path / "src" / "tag-x" / "7.json"
    src.parent.mkdir(parents=True)
    src.write_text(json.dumps(steps))
    import_trace("auto", [tmp_path / "src"], tmp_path / "t", ImportOptions(num_experts=8))
    want, pos = [], 0
    for i, step in enumerate(steps):
        n = max((len(v) for v in step.values() if v is not None), default=0)
        for lay in sorted(int(k) for k, v in step.items() if v):
            want += [("tag-x", i, "prefill" if i == 0 else "decode", pos + t, lay, step[str(lay)][t]) for t in range(n)]
        pos += n
    assert _rows(tmp_path / "t") == sorted(want)
