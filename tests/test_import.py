"""`moeprof import`: each engine's dump, built in the engine's exact structure, checked row by row."""

from __future__ import annotations

import sys

import polars as pl
import pytest

import import_fixtures as fx
from moeprof.importers import FORMATS, ImportOptions, detect, export_jsonl, import_trace
from moeprof.trace.reader import Trace


def rows(trace_dir, cols=("request_id", "step", "phase", "pos", "layer", "experts", "batch_id", "token_id")):
    frame = Trace.open(trace_dir, verify="full").routing().collect()
    frame = frame.with_columns(pl.col("phase").cast(pl.String), pl.col("experts").arr.to_list())
    return [tuple(r) for r in frame.select(list(cols)).iter_rows()]


def loads(trace_dir):
    frame = Trace.open(trace_dir, verify="full").loads().collect()
    frame = frame.with_columns(pl.col("phase").cast(pl.String)).sort(["window", "layer", "expert"])
    return [tuple(r) for r in frame.select(["window", "phase", "layer", "expert", "count", "request_id", "domain"]).iter_rows()]


def test_importing_the_package_does_not_import_torch():
    import subprocess

    code = "import sys, moeprof.importers as m; m.registry(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_named_format_imports_its_own_importer_alone_and_no_pyarrow_compute(tmp_path):
    # Each import loaded every importer module and the trace writer pyarrow.compute: about 60 ms of a
    # 10^4-row import's 90 (issue 18's JSONL target is 2x polars' 30 ms). Then numpy.ma, which plain
    # np.unique and pa.array(ndarray) import on first use: about 20 ms more.
    import subprocess

    src = fx.hook_jsonl(tmp_path / "h.txt")
    code = ("import sys; from pathlib import Path; from moeprof.importers import import_trace, ImportOptions; "
            "import_trace('jsonl', [Path(sys.argv[1])], Path(sys.argv[2]), ImportOptions()); "
            "print(sorted(m for m in sys.modules if m.startswith('moeprof.importers.') "
            "or m in ('pyarrow.compute', 'numpy.ma')))")
    out = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "t")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout.strip().splitlines()[-1])
    assert "moeprof.importers.jsonl" in loaded
    assert not {"moeprof.importers.vllm", "moeprof.importers.sglang", "moeprof.importers.megatron",
                "moeprof.importers.trtllm", "moeprof.importers.expert_selection", "pyarrow.compute",
                "numpy.ma"} & set(loaded), loaded
    assert rows(tmp_path / "t")  # and the trace it wrote holds its rows


def test_detect_reads_the_files_own_structure(tmp_path):
    built = {
        "sglang": [fx.sglang_per_token(tmp_path / "a.bin"), fx.sglang_stat(tmp_path / "b.bin")],
        "vllm": [fx.vllm_openai(tmp_path / "c.txt"), fx.vllm_split(tmp_path / "d.txt"), fx.vllm_offline(tmp_path / "e.txt")],
        "megatron": [fx.megatron_trace(tmp_path / "f.txt")],
        "megatron-tpe": [fx.megatron_tpe(tmp_path / "g.txt")],
        "jsonl": [fx.hook_jsonl(tmp_path / "h.txt")],
        "expert-selection": [fx.expert_selection(tmp_path / "es"), fx.expert_selection(tmp_path / "es2", tar=True)],
        "trtllm": [fx.trtllm_statistic(tmp_path / "stat")],
    }
    (tmp_path / "i.txt").write_text("layer,expert,count\n1,2,3\n")
    built["counts"] = [tmp_path / "i.txt"]
    for fmt, paths in built.items():
        for p in paths:
            assert detect(p) == fmt, p
    assert set(built) == set(FORMATS)


# -- SGLang -------------------------------------------------------------------------------------------
def test_sglang_per_token_row_by_row(tmp_path):
    src = fx.sglang_per_token(tmp_path / "expert_distribution_recorder_1.0_0.pt")
    rep = import_trace("auto", [src], tmp_path / "t", ImportOptions(drop_warmup=True))
    # Physical 4 -> logical 0, physical 5 -> logical 1; layer 0 (dense, all -1) absent; the padded
    # token (-1) of layer 2 dropped; EXTEND tokens split into sequences by extend_seq_lens.
    assert rows(tmp_path / "t") == [
        (0, 0, "prefill", 0, 1, [1, 0], 5, 11),
        (0, 0, "prefill", 1, 1, [1, 2], 5, 12),
        (0, 0, "prefill", 2, 1, [3, 1], 5, 13),
        (1, 0, "prefill", 0, 1, [2, 1], 5, 21),
        (1, 0, "prefill", 1, 1, [0, 3], 5, 22),
        (0, 0, "prefill", 0, 2, [1, 2], 5, 11),
        (0, 0, "prefill", 1, 2, [3, 0], 5, 12),
        (0, 0, "prefill", 2, 2, [1, 0], 5, 13),
        (1, 0, "prefill", 0, 2, [2, 3], 5, 21),
        (2, 1, "decode", 3, 1, [0, 3], 6, 14),
        (3, 1, "decode", 2, 1, [1, 0], 6, 23),
        (2, 1, "decode", 3, 2, [2, 1], 6, 14),
        (3, 1, "decode", 2, 2, [0, 1], 6, 23),
    ]
    trace = Trace.open(tmp_path / "t")
    m = trace.manifest
    assert (m.source, m.model.num_experts, m.model.top_k, m.model.moe_layers, m.model.num_layers) == ("sglang", 4, 2, [1, 2], 3)
    assert set(m.missing) == {"weights", "request_ids"}
    assert rep.warmup == {fx_warm(): 8}
    assert rep.skipped == {
        "-1 padded token slots (no expert selected)": 1,
        "forward_mode MIXED passes (prefill and decode tokens cannot be told apart, or speculative/verify passes)": 9,
    }
    assert "warm-up: 8 rows dropped: " + fx_warm() in m.notes
    req = trace.requests().sort("request_id")
    assert req["prompt_tokens"].to_list() == [3, 2, 0, 0]
    assert req["decode_tokens"].to_list() == [0, 0, 1, 1]


def fx_warm() -> str:
    from moeprof.importers.base import WARMUP_IDENTICAL

    return WARMUP_IDENTICAL


def test_sglang_warmup_kept_without_drop_and_reported(tmp_path, cli):
    src = fx.sglang_per_token(tmp_path / "d.pt")
    res = cli("import", "sglang", src, "--out", tmp_path / "t")
    assert res.exit_code == 0, res.stderr
    assert "warm-up: 8 rows kept; pass --drop-warmup to drop them" in " ".join(res.stdout.split())
    assert len(rows(tmp_path / "t")) == 13 + 8


def test_sglang_per_pass_maps_physical_counts_to_logical(tmp_path):
    src = fx.sglang_per_pass(tmp_path / "pp.pt")
    import_trace("sglang", [src], tmp_path / "t")
    assert loads(tmp_path / "t") == [(9, None, 1, 0, 7, None, None), (9, None, 1, 1, 1, None, None), (9, None, 1, 3, 2, None, None)]
    m = Trace.open(tmp_path / "t").manifest
    assert m.capture["sglang_mode"] == "per_pass" and "phase" in m.missing and "per_token" in m.missing


def test_sglang_stat_counts_per_pass(tmp_path):
    rep = import_trace("auto", [fx.sglang_stat(tmp_path / "s.pt")], tmp_path / "t")
    assert loads(tmp_path / "t") == [
        (0, None, 1, 0, 5, None, None), (0, None, 1, 2, 2, None, None), (0, None, 1, 3, 1, None, None),
        (0, None, 2, 1, 3, None, None), (0, None, 2, 2, 3, None, None), (0, None, 2, 3, 2, None, None),
        (1, None, 1, 0, 1, None, None), (1, None, 1, 1, 1, None, None), (1, None, 1, 2, 1, None, None),
        (1, None, 1, 3, 1, None, None),
    ]
    m = Trace.open(tmp_path / "t").manifest
    assert (m.model.num_experts, m.model.num_layers, m.model.moe_layers) == (4, 3, [1, 2])
    assert {"per_token", "phase", "request_ids", "weights"} <= set(m.missing)
    assert rep.skipped == {"all-zero pass rows (unfilled slots of SGLang's circular buffer)": 1}


# -- vLLM ---------------------------------------------------------------------------------------------
def _vllm_expected(rid, flip=False):
    out = []
    for t in range(5):
        for lay in (1, 2):
            e = [int(x) for x in fx.VLLM_ROUTES[t, lay]]
            out.append((rid, 0 if t < 3 else t - 2, "prefill" if t < 3 else "decode", t, lay,
                        e[::-1] if flip else e, None, 101 + t))
    return out


def test_vllm_openai_base64_npy(tmp_path):
    import_trace("auto", [fx.vllm_openai(tmp_path / "resp.jsonl")], tmp_path / "t")
    assert rows(tmp_path / "t") == _vllm_expected(0) + _vllm_expected(1, flip=True)
    m = Trace.open(tmp_path / "t").manifest
    assert (m.model.num_experts, m.model.top_k, m.model.moe_layers, m.model.num_layers) == (8, 2, [1, 2], 3)
    assert set(m.missing) == {"weights", "batch_id"}


def test_vllm_v021_split_prompt_and_generation(tmp_path):
    import_trace("vllm", [fx.vllm_split(tmp_path / "chat.json")], tmp_path / "t")
    assert rows(tmp_path / "t") == [r[:7] + (None,) for r in _vllm_expected(0)]
    assert "token_id" in Trace.open(tmp_path / "t").manifest.missing


def test_vllm_offline_request_output(tmp_path):
    import_trace("vllm", [fx.vllm_offline(tmp_path / "out.jsonl")], tmp_path / "t")
    assert rows(tmp_path / "t") == _vllm_expected(0)


def test_vllm_domains_attach_by_response_id(tmp_path):
    (tmp_path / "d.csv").write_text("request_id,domain\ncmpl-aaa,code\ncmpl-bbb,math\n")
    rep = import_trace("vllm", [fx.vllm_openai(tmp_path / "r.jsonl")], tmp_path / "t",
                       ImportOptions(domains=tmp_path / "d.csv"))
    req = Trace.open(tmp_path / "t").requests().sort("request_id")
    assert req.select("request_id", "domain", "prompt_tokens", "decode_tokens").rows() == [(0, "code", 3, 2), (1, "math", 3, 2)]
    assert f"domains: 2 of 2 requests found in {tmp_path / 'd.csv'}" in rep.notes


# -- Megatron -----------------------------------------------------------------------------------------
def test_megatron_router_trace(tmp_path):
    rep = import_trace("auto", [fx.megatron_trace(tmp_path / "router_trace_rank0.jsonl")], tmp_path / "t",
                       ImportOptions(num_experts=16))
    assert rows(tmp_path / "t") == [
        (-1, 0, "prefill", 0, 1, [12, 5], 0, None), (-1, 0, "prefill", 1, 1, [3, 7], 0, None),
        (-1, 0, "prefill", 2, 1, [0, 1], 0, None), (-1, 0, "prefill", 0, 3, [2, 4], 0, None),
        (-1, 0, "prefill", 1, 3, [6, 1], 0, None), (-1, 0, "prefill", 2, 3, [5, 7], 0, None),
        (-1, 1, "prefill", 0, 1, [9, 8], 1, None), (-1, 1, "prefill", 0, 3, [1, 0], 1, None),
    ]
    m = Trace.open(tmp_path / "t").manifest
    assert set(m.missing) == {"weights", "request_ids", "token_id", "positions", "phase"}
    assert (m.model.num_experts, m.model.moe_layers) == (16, [1, 3])
    assert rep.skipped == {"MTP-head router records (block 'mtp': not a model layer)": 1}


def test_megatron_tokens_per_expert(tmp_path):
    import_trace("auto", [fx.megatron_tpe(tmp_path / "rank0.jsonl")], tmp_path / "t")
    assert loads(tmp_path / "t") == [
        (0, None, 3, 0, 128, None, None), (0, None, 3, 1, 64, None, None),
        (0, None, 5, 0, 10, None, None), (0, None, 5, 1, 182, None, None),
        (1, None, 3, 0, 96, None, None), (1, None, 3, 1, 80, None, None),
        (1, None, 5, 0, 0, None, None), (1, None, 5, 1, 176, None, None),
    ]
    assert Trace.open(tmp_path / "t").model.num_experts == 2


# -- JSONL and counts ---------------------------------------------------------------------------------
def test_hook_jsonl_warmup_detection(tmp_path):
    src = fx.hook_jsonl(tmp_path / "moe.jsonl")
    rep = import_trace("auto", [src], tmp_path / "t", ImportOptions(drop_warmup=True))
    assert rows(tmp_path / "t", ("request_id", "step", "phase", "pos", "layer", "experts", "weights")) == [
        (0, 0, "prefill", 0, 0, [0, 3], [0.75, 0.25]), (0, 0, "prefill", 0, 1, [0, 4], [0.75, 0.25]),
        (0, 0, "prefill", 1, 0, [5, 1], [0.75, 0.25]), (0, 0, "prefill", 1, 1, [5, 2], [0.75, 0.25]),
        (0, 1, "decode", 2, 0, [7, 2], [0.75, 0.25]), (0, 1, "decode", 2, 1, [7, 3], [0.75, 0.25]),
    ]
    from moeprof.importers.base import WARMUP_IDENTICAL, WARMUP_NO_REQUEST

    assert rep.warmup == {WARMUP_NO_REQUEST: 2, WARMUP_IDENTICAL: 8}
    m = Trace.open(tmp_path / "t").manifest
    assert m.model.name == "toy-moe" and m.model.num_experts == 8
    assert set(m.missing) == {"batch_id", "token_id"}
    assert f"warm-up: 2 rows dropped: {WARMUP_NO_REQUEST}" in m.notes


def test_jsonl_field_renames_and_phase_from_prompt_len(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text("".join(
        f'{{"rid": 7, "t": {t}, "layer": 2, "experts": [{t}, {t + 1}]}}\n' for t in range(3)))
    (tmp_path / "p.csv").write_text("request_id,prompt_tokens\n7,2\n")
    import_trace("jsonl", [src], tmp_path / "t", ImportOptions(
        fields={"req_id": "rid", "token_idx": "t", "topk_ids": "experts"}, phase_from=f"prompt-len:{tmp_path / 'p.csv'}"))
    assert rows(tmp_path / "t", ("request_id", "step", "phase", "pos", "experts")) == [
        (7, 0, "prefill", 0, [0, 1]), (7, 0, "prefill", 1, [1, 2]), (7, 1, "decode", 2, [2, 3])]
    assert "phase" not in Trace.open(tmp_path / "t").manifest.missing


def test_counts_csv_and_parquet_with_domains(tmp_path):
    csv = tmp_path / "counts.csv"
    csv.write_text("layer,expert,count,domain,phase,request_id\n"
                   "1,0,10,code,prefill,\n1,3,4,code,decode,\n1,2,7,,,q1\n")
    (tmp_path / "d.csv").write_text("request_id,domain\nq1,math\n")
    import_trace("auto", [csv], tmp_path / "t", ImportOptions(domains=tmp_path / "d.csv"))
    assert loads(tmp_path / "t") == [(0, "prefill", 1, 0, 10, None, "code"), (0, None, 1, 2, 7, 0, "math"),
                                     (0, "decode", 1, 3, 4, None, "code")]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"layer": [0, 0], "expert": [1, 2], "count": [5, 6], "domain": ["chat", "chat"],
                             "window": [3, 3]}), tmp_path / "c.parquet")
    import_trace("auto", [tmp_path / "c.parquet"], tmp_path / "t2")
    assert loads(tmp_path / "t2") == [(3, None, 0, 1, 5, None, "chat"), (3, None, 0, 2, 6, None, "chat")]
    assert {"per_token", "phase", "request_ids"} <= set(Trace.open(tmp_path / "t2").manifest.missing)


# -- round trip ---------------------------------------------------------------------------------------
ALL = ("request_id", "step", "phase", "pos", "layer", "experts", "weights", "batch_id", "token_id")


@pytest.mark.parametrize("builder,opts", [
    (fx.hook_jsonl, ImportOptions()),
    (fx.sglang_per_token, ImportOptions()),
    (fx.vllm_openai, ImportOptions(domains=None)),
    (fx.megatron_trace, ImportOptions()),
])
def test_round_trip_trace_export_import_keeps_every_row(tmp_path, builder, opts):
    src = builder(tmp_path / "src")
    import_trace("auto", [src], tmp_path / "a", opts)
    first = Trace.open(tmp_path / "a")
    n = export_jsonl(first, tmp_path / "a.jsonl")
    assert n == first.num_routing_rows
    rep = import_trace("auto", [tmp_path / "a.jsonl"], tmp_path / "b")
    second = Trace.open(tmp_path / "b", verify="full")
    assert rep.warmup == first_report_warmup(tmp_path / "a")
    assert rows(tmp_path / "b", ALL) == rows(tmp_path / "a", ALL)
    assert second.manifest.missing.keys() == first.manifest.missing.keys()
    assert second.model.top_k == first.model.top_k and second.model.moe_layers == first.model.moe_layers
    assert second.requests().sort("request_id")["domain"].to_list() == first.requests().sort("request_id")["domain"].to_list()


def first_report_warmup(trace_dir):
    """Warm-up kept in the first import is detected again in the second (same rows, same reasons)."""
    out = {}
    for note in Trace.open(trace_dir).manifest.notes:
        if note.startswith("warm-up: "):
            count, _, reason = note[len("warm-up: "):].partition(" rows kept (pass --drop-warmup to drop them): ")
            out[reason] = int(count)
    return out


def test_round_trip_large_trace_streams_in_shards(tmp_path):
    """50k rows over several shards and chunks: every row comes back in order."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 50_000
    src = tmp_path / "big.jsonl"
    with open(src, "w") as fh:
        for i in range(n):
            e = rng.choice(64, 4, replace=False).tolist()
            fh.write(f'{{"req_id": {i // 500}, "token_idx": {i // 4 % 125}, "layer": {i % 4}, "topk_ids": {e}, '
                     f'"topk_weights": [0.4, 0.3, 0.2, 0.1], "step": {0 if i // 4 % 125 < 100 else i // 4 % 125 - 99}}}\n')
    import_trace("jsonl", [src], tmp_path / "a", ImportOptions(shard_rows=20_000, chunk_rows=7_000))
    a = Trace.open(tmp_path / "a", verify="full")
    assert len(a.manifest.shards_of("routing")) == 3 and a.num_routing_rows == n
    export_jsonl(a, tmp_path / "a.jsonl")
    import_trace("jsonl", [tmp_path / "a.jsonl"], tmp_path / "b")
    assert rows(tmp_path / "b", ALL) == rows(tmp_path / "a", ALL)
