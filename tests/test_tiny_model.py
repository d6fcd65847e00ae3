"""The embedded default: the sample workload and the shipped tiny MoE (sample_data/).

Known answers for the evidence statistics first, then the workload's invariants, then the shipped
weights themselves: they load offline as a standard transformers MoE class, beat a unigram baseline on
held-out prompts in every domain, and route by domain far more than the same model with its router
re-initialised.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
MODEL = SAMPLE / "tiny-moe"
PROMPTS = SAMPLE / "prompts.jsonl"
sys.path.insert(0, str(ROOT / "scripts"))

import evaluate_tiny_moe as ev  # noqa: E402

DOMAINS = {"code", "math", "chat", "general"}


# ---------------------------------------------------------------------------------- known answers

def test_js_divergence_known_answers():
    assert ev.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert ev.js_divergence([3, 1, 2], [6, 2, 4]) == pytest.approx(0.0)
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4):
    # KL(p||m) = 1/2 log2(2/3) + 1/2 log2(2) = 0.2075187, KL(q||m) = log2(4/3) = 0.4150375
    assert ev.js_divergence([1, 1], [1, 0]) == pytest.approx(0.5 * (0.2075187 + 0.4150375), abs=1e-6)


def test_mean_pairwise_js_averages_pairs_then_layers():
    pop = {
        "a": np.array([[1, 0], [1, 1]]),
        "b": np.array([[0, 1], [1, 1]]),
    }
    mean, per_layer = ev.mean_pairwise_js(pop)
    assert per_layer.tolist() == pytest.approx([1.0, 0.0])
    assert mean == pytest.approx(0.5)


def test_unigram_entropy_known_answers():
    assert ev.unigram_entropy(np.array([7, 7, 9, 9])) == pytest.approx(math.log(2))
    assert ev.unigram_entropy(np.array([5, 5, 5])) == pytest.approx(0.0)


def test_unigram_cross_entropy_known_answer():
    # counts (2, 0, 1) + 1 → probabilities (3/6, 1/6, 2/6); tokens 0 and 2 → -(ln 1/2 + ln 1/3) / 2
    got = ev.unigram_cross_entropy(np.array([2, 0, 1]), np.array([0, 2]))
    assert got == pytest.approx((math.log(2) + math.log(3)) / 2)


# ------------------------------------------------------------------------------------- workload

def _workload() -> list[dict]:
    return [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_workload_is_balanced_well_formed_and_interleaved():
    records = _workload()
    assert Counter(r["domain"] for r in records) == {d: 100 for d in DOMAINS}
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert isinstance(r["id"], str) and r["dataset"] and r["id"].startswith(r["dataset"] + "/")
        assert ("text" in r) != ("messages" in r)
        if "messages" in r:
            assert r["domain"] == "chat"
            assert [m["role"] for m in r["messages"]] == ["user"] and r["messages"][0]["content"].strip()
        else:
            assert r["text"].strip()
    # Any prefix of 4n lines holds n prompts of each domain.
    assert [r["domain"] for r in records[:8]] == ["code", "math", "chat", "general"] * 2


def test_workload_is_the_one_the_model_held_out():
    provenance = json.loads((MODEL / "provenance.json").read_text())
    assert provenance["prompts_sha256"] == hashlib.sha256(PROMPTS.read_bytes()).hexdigest()
    assert provenance["held_out_prompt_ids"] == len(_workload())


# ------------------------------------------------------------------------------- shipped weights

def test_shipped_model_files_and_size():
    names = {p.name for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "TRAINING.md", "provenance.json", "unigram_counts.npz"} <= names
    assert (MODEL / "model.safetensors").stat().st_size <= 20_000_000
    assert sum(p.stat().st_size for p in MODEL.iterdir()) <= 21_000_000


@pytest.fixture(scope="module")
def loaded(monkeypatch_module):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return ev.load(MODEL)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_loads_offline_as_a_standard_transformers_moe(loaded):
    import torch
    from transformers import Qwen3MoeForCausalLM

    model, tokenizer = loaded
    assert type(model) is Qwen3MoeForCausalLM
    assert model.dtype == torch.float32
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (4, 32, 4)
    assert len(tokenizer) == cfg.vocab_size
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_route_counts_cover_every_real_token(loaded):
    model, tokenizer = loaded
    texts = ["def add(a, b):\n    return a + b\n", "The minister said on Tuesday that talks would resume."]
    out = ev.prompt_pass(model, tokenizer, texts, batch_size=2)
    real = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert len(out["targets"]) == real - len(texts)
    assert out["routes"].sum(axis=1).tolist() == [real * model.config.num_experts_per_tok] * model.config.num_hidden_layers


@pytest.fixture(scope="module")
def evidence(loaded):
    return ev.evaluate(MODEL, PROMPTS, per_domain=40, control_seeds=2)


def test_held_out_loss_is_clearly_below_the_unigram_baselines(evidence):
    for domain, r in evidence["loss"].items():
        assert r["tokens"] > 1000, domain
        # The domain's unigram model fitted on the training split: the usual baseline.
        assert r["model"] < 0.85 * r["unigram_train"], (domain, r)
        # Even below the unigram fitted on the held-out text itself.
        assert r["model"] < r["unigram_oracle"], (domain, r)


def test_domains_use_experts_differently_far_beyond_sampling_noise(evidence):
    # Between-domain JS against the JS between two halves of one domain's prompts.
    assert evidence["js_trained"] > 0.05
    assert evidence["js_trained"] > 10 * evidence["js_within_domain"], evidence


def test_router_is_more_domain_selective_than_a_reinitialised_one(evidence):
    # Hidden states already differ by domain, so even a random router routes domains differently;
    # the trained router must do so clearly more (shipped weights: 0.151 vs 0.097 on all 400 prompts).
    assert evidence["js_trained"] > 1.3 * evidence["js_reinit_router"], evidence
