"""Static-cache and compiled decoding record the same routing as eager decoding.

transformers compiles decode steps only on GPUs by default; ``_compile_all_devices`` lets the CPU
take the same path (dynamo tracing, graph breaks, hook guards). ``aot_eager`` keeps the test quick;
CUDA graphs themselves are exercised by ``bench/gpu_capture.py`` on a GPU.
"""

from __future__ import annotations

import polars as pl
import pytest
import torch
import transformers as tf
from transformers.generation.configuration_utils import CompileConfig

import moeprof
from moeprof.trace import Trace

KEY = ["request_id", "step", "pos", "layer", "experts", "token_id"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    return tf.Qwen3MoeForCausalLM(cfg).eval()


INPUTS = dict(
    input_ids=torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]]),
    attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
    max_new_tokens=6,
    do_sample=False,
    pad_token_id=0,
)


def _compile_config():
    cc = CompileConfig(backend="aot_eager", fullgraph=False, mode=None)
    cc._compile_all_devices = True
    return cc


def _capture(model, out, **kw) -> pl.DataFrame:
    with moeprof.capture(model, out, force=True, eos_token_id=None):
        model.generate(**INPUTS, **kw)
    return Trace.open(out).routing().sort("request_id", "pos", "layer").collect().select(KEY)


def test_static_cache_records_what_dynamic_cache_records(model, tmp_path):
    dynamic = _capture(model, tmp_path / "dyn")
    static = _capture(model, tmp_path / "static", cache_implementation="static")
    # 3 + 5 prompt tokens (padding dropped) and 5 fed-back tokens per request, 2 MoE layers
    assert dynamic.height == 2 * (3 + 5 + 2 * 5)
    assert static.equals(dynamic)


def test_compiled_decoding_records_every_step_even_if_compiled_before_capture(model, tmp_path):
    eager = _capture(model, tmp_path / "eager")
    # Compile first, without capture: code compiled now has no hooks in it.
    model.generate(**INPUTS, cache_implementation="static", compile_config=_compile_config())
    assert getattr(model, "_compiled_call", None) is not None
    compiled = _capture(model, tmp_path / "compiled", cache_implementation="static", compile_config=_compile_config())
    assert getattr(model, "_compiled_call", None) is not None, "decode steps did not run compiled"
    assert compiled.equals(eager)
    assert sorted(compiled["step"].unique().to_list()) == [0, 1, 2, 3, 4, 5]
    notes = Trace.open(tmp_path / "compiled").manifest.notes
    assert any("compiled before capture" in n for n in notes)


def test_compiled_weights_are_flagged_in_the_manifest(model, tmp_path):
    """Weights read from compiled steps come with a note (capture's hooks are part of that graph);
    ids only, a static cache without compiling, and eager decoding come without it."""
    from moeprof.capture.session import COMPILED_WEIGHTS_NOTE

    def notes(out, weights=True, **kw):
        with moeprof.capture(model, out, force=True, eos_token_id=None, weights=weights):
            model.generate(**INPUTS, **kw)
        return Trace.open(out).manifest.notes

    compiled = dict(cache_implementation="static", compile_config=_compile_config())
    assert COMPILED_WEIGHTS_NOTE in notes(tmp_path / "compiled", **compiled)
    assert COMPILED_WEIGHTS_NOTE not in notes(tmp_path / "ids", weights=False, **compiled)
    torch._dynamo.reset()
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    assert COMPILED_WEIGHTS_NOTE not in notes(tmp_path / "eager")
    assert COMPILED_WEIGHTS_NOTE not in notes(tmp_path / "static", cache_implementation="static")


class _Outer(torch.nn.Module):
    """A caller's own module around the model: compiling it makes dynamo inline the model's call,
    capture's top-level hooks included."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


def test_hooks_run_eagerly_inside_a_callers_compiled_module(model, tmp_path):
    """Called inside a caller's compiled module (dynamo inlines the model's call and meets capture's
    top-level hooks there), the capture records each forward once, the same rows as eagerly."""
    batch = dict(input_ids=INPUTS["input_ids"], attention_mask=INPUTS["attention_mask"])

    def forwards(out, fn):
        with moeprof.capture(model, out, force=True, eos_token_id=None) as rec:
            with torch.no_grad():
                fn(**batch)
                fn(**batch)
        assert rec.rows == 2 * 2 * 8  # 2 forwards x 2 MoE layers x 8 real tokens
        return Trace.open(out).routing().sort("request_id", "pos", "layer").collect().select(KEY)

    eager = forwards(tmp_path / "eager", _Outer(model))
    torch._dynamo.reset()
    compiled = forwards(tmp_path / "compiled", torch.compile(_Outer(model), backend="aot_eager"))
    assert compiled.equals(eager)
