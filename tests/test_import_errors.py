"""Bad input to `moeprof import`: the exact message (file and record), exit code 2, no traceback."""

from __future__ import annotations

import json
import pickle

import pytest

import import_fixtures as fx


def err(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and res.stdout == ""
    return " ".join(res.stderr.split())


def test_help_has_an_example(cli):
    res = cli("import", "--help")
    assert res.exit_code == 0 and "Example:" in res.stdout and "--drop-warmup" in res.stdout


def test_unknown_format_from_content(cli, tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello\n")
    assert err(cli("import", "auto", p, "--out", tmp_path / "t")) == (
        f"Error: {p}: cannot tell its format from its content; name it: moeprof import FORMAT "
        "(one of sglang, vllm, megatron, megatron-tpe, trtllm, jsonl, counts, expert-selection)"
    )


def test_wrong_format_named(cli, tmp_path):
    p = fx.hook_jsonl(tmp_path / "h.jsonl")
    assert err(cli("import", "sglang", p, "--out", tmp_path / "t")) == (
        f"Error: {p}: not a readable torch file (truncated, or not written by torch.save)"
    )
    assert err(cli("import", "megatron", p, "--out", tmp_path / "t")) == (
        f"Error: {p}: line 1: field 'step' is missing; not a Megatron router trace record"
    )
    assert err(cli("import", "vllm", p, "--out", tmp_path / "t")) == (
        f"Error: {p}: line 1: no routed_experts found (expected choices[i].routed_experts, "
        "outputs[i].routed_experts or prompt_routed_experts); was the server started with "
        "--enable-return-routed-experts?"
    )


def test_unknown_format_name(cli, tmp_path):
    p = fx.hook_jsonl(tmp_path / "h.jsonl")
    assert err(cli("import", "tensorrt", p, "--out", tmp_path / "t")) == (
        "Error: unknown import format 'tensorrt'; choose one of: auto, sglang, vllm, megatron, megatron-tpe, trtllm, "
        "jsonl, counts, expert-selection"
    )


def test_truncated_jsonl(cli, tmp_path):
    p = fx.hook_jsonl(tmp_path / "h.jsonl")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 30])
    n = data[: len(data) - 30].count(b"\n") + 1
    assert err(cli("import", "auto", p, "--out", tmp_path / "t")) == (
        f"Error: {p}: line {n}: not valid JSON (the file is cut off here, or not a JSONL routing log)"
    )
    # A failed import leaves nothing behind (issue 12): no trace, no hidden staging directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.jsonl"]


def test_truncated_sglang_dump(cli, tmp_path):
    p = fx.sglang_per_token(tmp_path / "d.pt")
    p.write_bytes(p.read_bytes()[:600])
    assert err(cli("import", "sglang", p, "--out", tmp_path / "t")) == (
        f"Error: {p}: not a readable torch file (truncated, or not written by torch.save)"
    )


class NotATensor:
    """Pickled by reference: torch.load(weights_only=True) must refuse it."""


def test_unsafe_pickle_is_refused(cli, tmp_path):
    import torch

    p = tmp_path / "evil.pt"
    torch.save({"records": [NotATensor()], "last_physical_to_logical_map": torch.zeros(1, 2)}, p)
    assert err(cli("import", "auto", p, "--out", tmp_path / "t")) == (
        f"Error: {p}: refusing to load: the file holds objects that only unsafe unpickling can restore "
        "(torch.load weights_only=True refused it), and moeprof never unpickles arbitrary code; "
        "an SGLang recorder dump holds only tensors, lists and numbers"
    )
    # A legacy pickle that is not torch's format at all is not even detected as SGLang.
    q = tmp_path / "plain.pkl"
    q.write_bytes(pickle.dumps({"a": 1}))
    assert "cannot tell its format" in err(cli("import", "auto", q, "--out", tmp_path / "t2"))


def test_expert_ids_out_of_range(cli, tmp_path):
    p = fx.hook_jsonl(tmp_path / "h.jsonl", warmup=False)
    assert err(cli("import", "jsonl", p, "--out", tmp_path / "t", "--num-experts", "6")) == (
        f"Error: {p}: line 6: expert id 7 is out of range for 6 experts (ids run 0..5); check --num-experts"
    )
    s = fx.sglang_per_token(tmp_path / "d.pt")
    assert err(cli("import", "sglang", s, "--out", tmp_path / "t2", "--num-experts", "3")) == (
        f"Error: {s}: record 1: expert id 3 is out of range for 3 experts (ids run 0..2); check --num-experts"
    )
    m = fx.megatron_trace(tmp_path / "router_trace_rank0.jsonl")
    assert err(cli("import", "megatron", m, "--out", tmp_path / "t3", "--num-experts", "8")) == (
        f"Error: {m}: line 1: expert id 12 is out of range for 8 experts (ids run 0..7); check --num-experts"
    )
    v = fx.vllm_openai(tmp_path / "v.jsonl")
    assert err(cli("import", "vllm", v, "--out", tmp_path / "t4", "--num-experts", "4")) == (
        f"Error: {v}: line 1: expert id 7 is out of range for 4 experts (ids run 0..3); check --num-experts"
    )
    c = tmp_path / "c.csv"
    c.write_text("layer,expert,count\n0,1,5\n0,9,2\n")
    assert err(cli("import", "counts", c, "--out", tmp_path / "t5", "--num-experts", "4")) == (
        f"Error: {c}: line 3: expert id 9 is out of range for 4 experts (ids run 0..3); check --num-experts"
    )


def test_inconsistent_top_k(cli, tmp_path):
    p = tmp_path / "k.jsonl"
    lines = [{"req_id": 1, "token_idx": t, "layer": 0, "topk_ids": [1, 2] if t < 2 else [1, 2, 3]} for t in range(3)]
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert err(cli("import", "auto", p, "--out", tmp_path / "t")) == (
        f"Error: {p}: line 3: inconsistent top-k: 3 expert ids here, 2 on line 1"
    )
    m = tmp_path / "router_trace_rank0.jsonl"
    m.write_text(json.dumps({"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 0, "rank": 0,
                             "num_tokens": 2, "topk": 2, "top_indices": [[1, 2], [3, 4, 5]]}) + "\n")
    assert err(cli("import", "auto", m, "--out", tmp_path / "t2")) == (
        f"Error: {m}: line 1: inconsistent top-k: tokens list different numbers of expert ids"
    )
    # Across files: each file is consistent, together they are not.
    q = tmp_path / "k2.jsonl"
    q.write_text(json.dumps({"req_id": 2, "token_idx": 0, "layer": 0, "topk_ids": [1, 2, 3]}) + "\n")
    p.write_text("".join(json.dumps(x) + "\n" for x in lines[:2]))
    assert err(cli("import", "jsonl", p, q, "--out", tmp_path / "t3")) == (
        f"Error: {q}: line 1: inconsistent top-k: 3 expert ids here, 2 on {p} line 1"
    )
    s = fx.sglang_per_token(tmp_path / "d.pt")
    assert err(cli("import", "sglang", s, "--out", tmp_path / "t4", "--top-k", "3")) == (
        f"Error: {s}: record 1 (forward_pass_id 0): inconsistent top-k: 2 experts per token here, 3 from --top-k"
    )


def test_missing_field_names_the_rename_option(cli, tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"req_id": 1, "token_idx": 0, "layer": 0, "experts": [1, 2]}) + "\n")
    assert err(cli("import", "jsonl", p, "--out", tmp_path / "t")) == (
        f"Error: {p}: line 1: field 'topk_ids' is missing (use --field topk_ids=NAME if it has another name)"
    )
    res = cli("import", "jsonl", p, "--out", tmp_path / "t2", "--field", "topk_ids=experts")
    assert res.exit_code == 0, res.stderr
    assert err(cli("import", "jsonl", p, "--out", tmp_path / "t3", "--field", "experts")) == (
        "Error: --field 'experts': expected CANONICAL=NAME, e.g. topk_ids=experts"
    )


def test_bad_counts_row_and_domain_map(cli, tmp_path):
    c = tmp_path / "c.csv"
    c.write_text("layer,expert,count\n0,1,5\n0,2,x\n")
    assert err(cli("import", "counts", c, "--out", tmp_path / "t")) == f"Error: {c}: line 3: count 'x' is not an integer"
    c.write_text("layer,expert,count\n0,1,5\n0,2\n")
    assert err(cli("import", "counts", c, "--out", tmp_path / "t2")) == (
        f"Error: {c}: line 3: 2 fields, the header has 3 (a truncated or malformed row)"
    )
    c.write_text("layer,expert,count\n0,1,5\n")
    d = tmp_path / "d.csv"
    d.write_text("id,label\n1,code\n")
    assert err(cli("import", "counts", c, "--out", tmp_path / "t3", "--domains", d)) == (
        f"Error: {d}: line 1: the domain map needs a header with columns request_id,domain (found id, label)"
    )


def test_output_exists_needs_force(cli, tmp_path):
    p = fx.hook_jsonl(tmp_path / "h.jsonl")
    assert cli("import", "auto", p, "--out", tmp_path / "t").exit_code == 0
    assert err(cli("import", "auto", p, "--out", tmp_path / "t")) == (
        f"Error: {tmp_path / 't'} already exists; pass --force to replace it"
    )
    assert cli("import", "auto", p, "--out", tmp_path / "t", "--force").exit_code == 0


def test_bad_phase_from(cli, tmp_path):
    p = fx.hook_jsonl(tmp_path / "h.jsonl")
    assert err(cli("import", "jsonl", p, "--out", tmp_path / "t", "--phase-from", "guess")) == (
        "Error: --phase-from 'guess': expected auto, none, field:NAME or prompt-len:FILE.csv"
    )


def test_phase_from_only_for_jsonl(cli, tmp_path):
    p = fx.megatron_trace(tmp_path / "router_trace_rank0.jsonl")
    assert err(cli("import", "auto", p, "--out", tmp_path / "t", "--phase-from", "none")) == (
        "Error: --phase-from applies to per-token JSONL only; megatron sources record the phase themselves "
        "or the trace marks it missing"
    )


@pytest.mark.parametrize("fmt", ["auto", "jsonl"])
def test_json_output_reports_warmup(cli, tmp_path, fmt):
    p = fx.hook_jsonl(tmp_path / "h.jsonl")
    res = cli("import", fmt, p, "--out", tmp_path / "t", "--drop-warmup", "--json")
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["routing_rows"] == 6 and rep["warmup_dropped"] is True and sum(rep["warmup_rows"].values()) == 10


def test_sglang_without_torch_says_what_to_install(cli, tmp_path, monkeypatch):
    import sys

    p = fx.sglang_stat(tmp_path / "s.pt")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    assert err(cli("import", "sglang", p, "--out", tmp_path / "t")) == (
        f"Error: {p}: reading SGLang .pt dumps needs torch, which is not installed; "
        "pip install torch (the CPU wheel is enough)"
    )
