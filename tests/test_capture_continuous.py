"""Capture under transformers' continuous batching (paged attention, packed prefill chunks and decode tokens).

The known answer: every request's rows equal what ``generate()`` records for the same prompt on its own
(same model, greedy): same positions, phases, steps, token ids and expert ids. The batches are real
serving batches: several requests per forward pass, prefills cut into chunks by a small token budget.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from moeprof.capture.session import capture
from moeprof.errors import CaptureError
from moeprof.sample_data import path
from moeprof.trace.reader import Trace

transformers = pytest.importorskip("transformers")
ContinuousBatchingConfig = getattr(transformers, "ContinuousBatchingConfig", None)
pytestmark = pytest.mark.skipif(
    ContinuousBatchingConfig is None,
    reason=f"transformers {transformers.__version__} has no continuous batching",
)

NEW = 5


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path("tiny-moe"), attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(path("tiny-moe"))
    rows = [json.loads(line) for line in path("prompts.jsonl").read_text().splitlines()]
    # 8 real prompts of 4 domains, cut to different lengths (9 to 44 tokens)
    picked = [r for d in ("code", "math", "chat", "general") for r in [x for x in rows if x["domain"] == d][:2]]
    prompts = []
    for i, r in enumerate(picked):
        text = r.get("text") or r["messages"][0]["content"]
        prompts.append((r["domain"], tok(text)["input_ids"][: 9 + 5 * i]))
    gen = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    return model, prompts, gen


def _config():
    # A token budget of 16 per forward pass: prompts of up to 44 tokens are prefilled in chunks, and
    # decode tokens of running requests share passes with other requests' prefill chunks.
    import inspect

    size = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters else "block_size"
    return ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=16, use_cuda_graph=False, **{size: 16})


def _alone(model, prompt, gen, out):
    with capture(model, out, domain="x") as rec:
        model.generate(input_ids=torch.tensor([prompt]), generation_config=gen)
    assert rec.steps == NEW
    return Trace.open(out).routing().collect().sort(["layer", "pos"])


def test_generate_batch_rows_equal_generate_per_request(tiny, tmp_path):
    model, prompts, gen = tiny
    with capture(model, tmp_path / "cb") as rec:
        for i, (domain, _) in enumerate(prompts):
            # generate_batch names requests req_0, req_1, ... in input order (a fresh manager); the
            # scheduler starts them in its own order
            rec.new_request(domain=domain, key=f"req_{i}")
        out = model.generate_batch(inputs=[p for _, p in prompts], generation_config=gen,
                                   continuous_batching_config=_config())
    trace = Trace.open(tmp_path / "cb", verify="full")
    assert trace.complete
    df = trace.routing().collect()
    req = trace.requests().sort("request_id")
    assert req["domain"].to_list() == [d for d, _ in prompts]
    assert req["prompt_tokens"].to_list() == [len(p) for _, p in prompts]
    assert req["decode_tokens"].to_list() == [NEW - 1] * len(prompts)

    # Real serving batches: passes that carry several requests, and prefills cut into chunks.
    per_pass = df.group_by("batch_id").agg(pl.col("request_id").n_unique())
    assert per_pass["request_id"].max() >= 2
    chunks = df.filter(pl.col("phase") == "prefill").group_by("request_id").agg(pl.col("batch_id").n_unique())
    assert chunks["batch_id"].max() >= 3
    mixed = df.group_by("batch_id").agg(pl.col("phase").cast(pl.String).n_unique())
    assert mixed["phase"].max() == 2  # some pass carries prefill chunks and decode tokens at once

    generated = list(out.values())
    for rid, (domain, prompt) in enumerate(prompts):
        want = _alone(model, prompt, gen, tmp_path / f"alone{rid}")
        got = df.filter(pl.col("request_id") == rid).sort(["layer", "pos"])
        assert got.height == want.height == 4 * (len(prompt) + NEW - 1)  # 4 MoE layers
        for col in ("pos", "layer", "step", "token_id"):
            assert got[col].to_list() == want[col].to_list(), col
        assert got["phase"].cast(pl.String).to_list() == want["phase"].cast(pl.String).to_list()
        np.testing.assert_array_equal(np.stack(got["experts"].to_numpy()), np.stack(want["experts"].to_numpy()))
        np.testing.assert_allclose(np.stack(got["weights"].to_numpy()), np.stack(want["weights"].to_numpy()), atol=1e-4)
        fed = got.filter((pl.col("layer") == 0) & (pl.col("phase") == "decode"))["token_id"].to_list()
        assert fed == generated[rid].generated_tokens[: NEW - 1]


def test_manager_requests_labelled_by_key(tiny, tmp_path):
    model, prompts, gen = tiny
    with capture(model, tmp_path / "cb") as rec:
        manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=_config())
        manager.start()
        try:
            # labelled in reverse: labels follow the engine's request ids, not the order of starting
            for i in reversed(range(4)):
                rec.new_request(domain=prompts[i][0], key=f"moeprof-{i}")
            for i in range(4):
                manager.add_request(prompts[i][1], request_id=f"moeprof-{i}", max_new_tokens=NEW)
            done = {}
            while len(done) < 4:
                result = manager.get_result(timeout=30)
                assert result is not None, "continuous batching stalled"
                if result.is_finished():
                    done[result.request_id] = result
        finally:
            manager.stop(block=True)
    trace = Trace.open(tmp_path / "cb")
    df = trace.routing().collect()
    req = trace.requests()
    for i in range(4):
        rid = 3 - i  # new_request was called in reverse order
        row = req.filter(pl.col("request_id") == rid)
        assert row["domain"].item() == prompts[i][0]
        assert row["prompt_tokens"].item() == len(prompts[i][1])
        rows = df.filter((pl.col("request_id") == rid) & (pl.col("layer") == 0)).sort("pos")
        assert rows["token_id"].to_list()[: len(prompts[i][1])] == prompts[i][1]


def test_unconsumed_batch_is_an_error(tiny, tmp_path):
    """A batch built but never run through the model's forward (what a replayed CUDA graph looks like)."""
    from transformers.generation.continuous_batching import model_runner

    model, prompts, gen = tiny
    real = model_runner.ModelRunner.compute_batch
    calls = {"n": 0}

    def skip_second(self, m, batch_data):
        calls["n"] += 1
        if calls["n"] != 2:
            return real(self, m, batch_data)
        # the step runs without calling the model (as a CUDA graph replay would)

    model_runner.ModelRunner.compute_batch = skip_second
    try:
        with pytest.raises(CaptureError, match="never reached the model's forward"):
            with capture(model, tmp_path / "cb"):
                model.generate_batch(inputs=[p for _, p in prompts[:3]], generation_config=gen,
                                     continuous_batching_config=_config())
    finally:
        model_runner.ModelRunner.compute_batch = real
    assert not Trace.open(tmp_path / "cb").complete
