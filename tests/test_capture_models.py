"""Capture on tiny random-weight models of 12 transformers MoE architectures.

Known answers first: the captured ids equal the router's choice recomputed from the router's own
weights and input (DeepSeek-V3: with the correction bias and group limits; never from what a given
transformers release chooses to return); then the
invariants of generate(): rows per request per MoE layer, no padding, steps and phases.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from capture_models import BUILDERS, build, deepseek_choice, gate_logits_hooks
from moeprof.capture.hooks import discover
from moeprof.capture.session import capture
from moeprof.trace.reader import Trace

ARCHS = list(BUILDERS)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


def _padded_batch(seed: int = 0):
    """3 prompts of lengths 7, 4, 6, left-padded with token 0 to length 7."""
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 6]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, 7 - n :] = torch.randint(1, 96, (n,), generator=g)
        mask[r, 7 - n :] = 1
    return ids, mask, lengths


def _recompute(name, model, expected, logits: torch.Tensor, layer: int) -> torch.Tensor:
    """The router's choice (n, k) recomputed from its logits by the model's documented rule."""
    k = expected.top_k
    if expected.rule == "topk_logits":
        # softmax is monotonic, so top-k of the softmax (mixtral, qwen, olmoe, dbrx) is top-k of the
        # logits; gpt-oss, granite, llama4 take top-k of the logits; phimoe's sparsemixer in eval
        # picks argmax, then argmax of the rest.
        return torch.topk(logits.float(), k, dim=-1).indices
    if expected.rule == "ernie_bias":
        gate = model.model.layers[layer].mlp.gate
        probs = torch.softmax(logits.float(), dim=-1) + gate.moe_statics.e_score_correction_bias.squeeze()
        return torch.topk(probs, k, dim=-1).indices
    if expected.rule == "deepseek":
        return deepseek_choice(model, logits, layer)
    raise AssertionError(expected.rule)


def _jetmoe_router_ids(model, layers):
    """Hook JetMoE's gating modules and rebuild (n, k) ids from their expert-sorted output."""
    seen = {}
    handles = []
    for layer in layers:
        router = model.model.layers[layer].mlp.router

        def hook(mod, args, out, layer=layer):
            index_sorted, _, _, expert_size, logits = out
            n, k = logits.shape[0], mod.top_k
            sorted_experts = torch.repeat_interleave(torch.arange(mod.num_experts), torch.tensor(expert_size))
            flat = torch.empty(n * k, dtype=torch.long)
            flat[index_sorted] = sorted_experts
            seen[layer] = flat.view(n, k)

        handles.append(router.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("name", ARCHS)
def test_discovery_matches_config(name, models):
    model, expected = models(name)
    layout = discover(model)
    info = layout.info
    assert info.moe_layers == expected.moe_layers
    assert info.dense_layers == expected.dense_layers
    assert info.num_experts == expected.num_experts
    assert info.top_k == expected.top_k
    assert info.num_shared_experts == expected.shared
    assert {p.kind for p in layout.points} == {expected.hook}
    assert info.num_layers == len(expected.moe_layers) + len(expected.dense_layers)


@pytest.mark.parametrize("name", ARCHS)
def test_prefill_ids_equal_router_choice(name, models, tmp_path):
    model, expected = models(name)
    ids, mask, lengths = _padded_batch()
    if expected.rule == "jetmoe_hook":
        jet, handles = _jetmoe_router_ids(model, expected.moe_layers)
    else:
        jet, handles = gate_logits_hooks(model, expected.moe_layers, expected.num_experts)
    try:
        with capture(model, tmp_path / "t", domain="x") as rec, torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    assert rec.steps == 1
    trace = Trace.open(tmp_path / "t", verify="full")
    df = trace.routing().collect()
    valid = mask.reshape(-1).bool()
    # positions of valid tokens in the flattened (b*s) order, per request
    for ordinal, layer in enumerate(expected.moe_layers):
        if expected.rule == "jetmoe_hook":
            want = jet[layer]
        else:
            want = _recompute(name, model, expected, jet[layer], layer)
        want = want[valid].numpy()
        got_df = df.filter(pl.col("layer") == layer).sort(["request_id", "pos"])
        got = np.stack(got_df["experts"].to_numpy())
        assert got.shape == want.shape
        assert got_df["request_id"].to_list() == [r for r, n in enumerate(lengths) for _ in range(n)]
        assert got_df["pos"].to_list() == [p for n in lengths for p in range(n)]
        if name == "deepseek_v3":  # topk(sorted=False): the order is not a ranking
            assert [set(r) for r in got] == [set(r) for r in want]
        else:
            np.testing.assert_array_equal(got, want)
    assert set(df["phase"].unique().to_list()) == {"prefill"}
    assert (df["step"] == 0).all()


@pytest.mark.parametrize("name", ARCHS)
def test_generate_rows_per_request(name, models, tmp_path):
    model, expected = models(name)
    ids, mask, lengths = _padded_batch(seed=1)
    new = 3
    with capture(model, tmp_path / "t", domain="code", dataset="unit") as rec:
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert gen.shape[1] == ids.shape[1] + new
    assert rec.steps == new  # one prefill + new - 1 decode forwards
    trace = Trace.open(tmp_path / "t", verify="full")
    assert trace.complete
    df = trace.routing().collect()
    L = len(expected.moe_layers)
    assert df.height == L * sum(n + new - 1 for n in lengths)
    counts = df.group_by(["request_id", "layer"]).len().sort(["request_id", "layer"])
    assert counts["len"].to_list() == [n + new - 1 for n in lengths for _ in range(L)]
    for r, n in enumerate(lengths):
        rows = df.filter((pl.col("request_id") == r) & (pl.col("layer") == expected.moe_layers[0])).sort("pos")
        assert rows["pos"].to_list() == list(range(n + new - 1))  # no padding, no gaps
        assert rows["step"].to_list() == [0] * n + list(range(1, new))
        assert rows["phase"].cast(pl.String).to_list() == ["prefill"] * n + ["decode"] * (new - 1)
        # token ids are the prompt, then the generated tokens fed back (not the last one)
        fed = ids[r, 7 - n :].tolist() + gen[r, 7 : 7 + new - 1].tolist()
        assert rows["token_id"].to_list() == fed
        assert rows["batch_id"].to_list() == [0] * n + list(range(1, new))
    req = trace.requests()
    assert req["prompt_tokens"].to_list() == lengths
    assert req["decode_tokens"].to_list() == [new - 1] * 3
    assert set(req["domain"].to_list()) == {"code"} and set(req["dataset"].to_list()) == {"unit"}
    experts = np.stack(df["experts"].to_numpy())
    assert experts.min() >= 0 and experts.max() < expected.num_experts
    assert (np.sort(experts, axis=1)[:, 1:] != np.sort(experts, axis=1)[:, :-1]).all()  # k distinct ids
    m = trace.manifest
    assert m.model.dense_layers == expected.dense_layers
    assert m.model.num_shared_experts == expected.shared
    assert [h["layer"] for h in m.capture["hooks"]] == expected.moe_layers
