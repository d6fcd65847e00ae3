"""Recorder semantics: the real choice (DeepSeek bias), EOS, padding sides, own loops, interruption."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
import transformers as tf

from capture_models import build, cache_kw, deepseek_choice, gate_logits_hooks
from moeprof.capture import session as session_mod
from moeprof.capture.session import capture
from moeprof.errors import CaptureError, OutputExistsError
from moeprof.trace.reader import Trace


@pytest.fixture(scope="module")
def qwen():
    return build("qwen3_moe")


@pytest.fixture(scope="module")
def olmoe():
    return build("olmoe")


def test_deepseek_records_bias_corrected_group_limited_choice(tmp_path):
    model, expected = build("deepseek_v3")
    favourite = 6  # in group 1 (experts 4-7)
    with torch.no_grad():
        for layer in expected.moe_layers:
            bias = torch.zeros(8)
            bias[favourite] = 0.8  # sigmoid scores lie in (0, 1): +0.8 lifts expert 6 for most tokens
            model.model.layers[layer].mlp.gate.e_score_correction_bias.copy_(bias)
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    seen, handles = gate_logits_hooks(model, expected.moe_layers, expected.num_experts)
    try:
        with capture(model, tmp_path / "t") as rec, torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    df = Trace.open(tmp_path / "t").routing().collect()
    differs = 0
    for layer in expected.moe_layers:
        logits = seen[layer]
        got = np.stack(df.filter(pl.col("layer") == layer).sort(["request_id", "pos"])["experts"].to_numpy())
        want = deepseek_choice(model, logits, layer).numpy()
        plain = torch.topk(logits, 2, dim=-1).indices.numpy()
        assert [set(r) for r in got] == [set(r) for r in want]
        # group limit (topk_group=1 of 2 groups): both experts of a token lie in one group
        assert (got // 4 == (got // 4)[:, :1]).all()
        assert (got == favourite).any(axis=1).mean() > 0.5
        differs += sum(set(a) != set(b) for a, b in zip(got, plain))
    assert differs > 0, "the constructed bias must make the real choice differ from a plain top-k"
    assert rec.steps == 1


def test_eos_ends_a_request_inside_a_batch(qwen, tmp_path):
    model, expected = qwen
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = int(free[0, 5 + 1])  # row 0's second generated token becomes EOS
    # The constructed case needs an EOS that only row 0 produces (true for this seed).
    assert eos not in free[1, 5:].tolist(), "constructed EOS also appears in row 1: pick another seed"
    with capture(model, tmp_path / "t", eos_token_id=[eos]):
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=eos
        )
    T = gen.shape[1] - 5  # forwards = T (prefill + T - 1 decode)
    assert T == 6
    req = Trace.open(tmp_path / "t").requests()
    # row 0 generated 2 tokens (the second is EOS); both were fed back since row 1 kept going
    assert req["decode_tokens"].to_list() == [2, T - 1]
    df = Trace.open(tmp_path / "t").routing().collect()
    row0 = df.filter((pl.col("request_id") == 0) & (pl.col("layer") == expected.moe_layers[0])).sort("pos")
    assert row0["token_id"].to_list()[-1] == eos
    assert row0["pos"].to_list() == list(range(7))


def test_right_padding_positions_skip_padding(olmoe, tmp_path):
    model, expected = olmoe
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with capture(model, tmp_path / "t"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    df = Trace.open(tmp_path / "t").routing().collect().filter(pl.col("layer") == 0)
    r1 = df.filter(pl.col("request_id") == 1).sort("pos")
    assert r1["pos"].to_list() == [0, 1, 2, 3]  # 2 prompt + 2 fed back, padding never counted
    assert r1["token_id"].to_list()[:2] == [9, 10]
    assert r1["step"].to_list() == [0, 0, 1, 2]


def test_own_loop_with_labels(qwen, tmp_path):
    model, expected = qwen
    with capture(model, tmp_path / "t", domain="general") as rec, torch.no_grad():
        rid = rec.new_request(domain="math", dataset="gsm8k", text="1+1=")
        out = model(input_ids=torch.tensor([[11, 12, 13]]), use_cache=True)
        past = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        for _ in range(2):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, **{cache_kw(model): past}, use_cache=True)
            past = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        model(input_ids=torch.tensor([[20, 21]]))  # a new sequence without a label: default domain
    assert rid == 0
    t = Trace.open(tmp_path / "t")
    req = t.requests().sort("request_id")
    assert req["domain"].to_list() == ["math", "general"]
    assert req["dataset"].to_list() == ["gsm8k", None]
    assert req["prompt_tokens"].to_list() == [3, 2] and req["decode_tokens"].to_list() == [2, 0]
    assert req["text_sha256"][0] is not None
    df = t.routing().collect().filter((pl.col("request_id") == 0) & (pl.col("layer") == 1)).sort("pos")
    assert df["pos"].to_list() == [0, 1, 2, 3, 4] and df["step"].to_list() == [0, 0, 0, 1, 2]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_interrupted_capture_keeps_finished_steps(qwen, tmp_path, exc):
    model, expected = qwen
    calls = {"n": 0}

    def bomb(module, args):
        calls["n"] += 1
        if calls["n"] == 4:  # during the 4th forward: steps 0, 1, 2 finished
            raise exc()

    handle = model.model.layers[expected.moe_layers[0]].register_forward_pre_hook(bomb)
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    try:
        with pytest.raises(exc):
            with capture(model, tmp_path / "t", buffer_rows=1):
                model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    t = Trace.open(tmp_path / "t", verify="full")
    assert t.complete is False
    df = t.routing().collect()
    assert sorted(df["step"].unique().to_list()) == [0, 1, 2]
    assert df.height == len(expected.moe_layers) * 2 * (5 + 2)
    assert t.requests()["decode_tokens"].to_list() == [2, 2]
    # hooks are gone: the model runs uncaptured afterwards
    assert not any(m._forward_pre_hooks for m in model.modules() if m is not model.model.layers[0])


def test_small_buffers_spill_into_many_shards(olmoe, tmp_path):
    model, expected = olmoe
    ids = torch.randint(1, 96, (3, 6), generator=torch.Generator().manual_seed(2))
    with capture(model, tmp_path / "t", buffer_rows=10, shard_rows=25):
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    t = Trace.open(tmp_path / "t", verify="full")
    shards = t.manifest.shards_of("routing")
    assert len(shards) == -(-t.num_routing_rows // 25)
    assert all(s.rows <= 25 for s in shards)
    assert t.num_routing_rows == 2 * 3 * (6 + 3)


def test_decode_steps_are_gathered_in_blocks_with_one_copy_each(qwen, tmp_path, monkeypatch):
    """Per layer only a reference; per forward one hand-over; the prefill is gathered on its own, the
    first decode step copied into a block (nothing to compare its addresses with yet), later decode
    steps (fresh outputs every step: eager) held and gathered a block at a time: up to 128 steps
    while a block's routing stays under 1 MiB, as here (32 for bigger steps: test_capture_blocks.py)."""
    from moeprof.capture.pipe import HostPipe

    model, expected = qwen
    units, records = [], []
    orig_add, orig_record = HostPipe._add, session_mod.StepSink.record

    def add(self, unit):
        units.append(len(unit.metas))
        return orig_add(self, unit)

    def record(self, *a):
        records.append(a[0])
        return orig_record(self, *a)

    monkeypatch.setattr(HostPipe, "_add", add)
    monkeypatch.setattr(session_mod.StepSink, "record", record)
    with capture(model, tmp_path / "t", weights=False) as rec:
        model.generate(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert rec.steps == 40 and units == [1, 1, 38]
    assert len(records) == 40 * len(expected.moe_layers)
    t = Trace.open(tmp_path / "t")
    assert "weights" in t.manifest.missing
    assert t.routing(["weights"]).collect()["weights"].null_count() == t.num_routing_rows


def test_model_without_moe_layers_is_refused(tmp_path):
    cfg = tf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    with pytest.raises(CaptureError, match="no MoE layers found"):
        capture(tf.LlamaForCausalLM(cfg), tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_existing_output_needs_force(qwen, tmp_path):
    model, _ = qwen
    with capture(model, tmp_path / "t"):
        model(input_ids=torch.tensor([[1, 2]]))
    with pytest.raises(OutputExistsError, match="--force"):
        capture(model, tmp_path / "t")
    with capture(model, tmp_path / "t", force=True):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert Trace.open(tmp_path / "t").requests()["prompt_tokens"].to_list() == [3]


def test_top_level_api_is_callable_after_submodule_imports(qwen, tmp_path):
    import moeprof
    import moeprof.capture.workload  # noqa: F401  (binds moeprof.capture to the package)

    model, _ = qwen
    with moeprof.capture(model, tmp_path / "t", domain="code") as rec:
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert rec.steps == 1 and moeprof.open_trace(tmp_path / "t").complete
