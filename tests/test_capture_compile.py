"""Static-cache and compiled decoding record the same routing as eager decoding.

transformers compiles decode steps only on GPUs by default; ``_compile_all_devices`` lets the CPU
take the same path (dynamo tracing, graph breaks, hook guards). ``aot_eager`` keeps the test quick;
CUDA graphs themselves are exercised by ``bench/gpu_capture.py`` on a GPU.
"""

from __future__ import annotations

import gc
import re
import sys

import polars as pl
import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters
from transformers.generation.configuration_utils import CompileConfig

import moeprof
from moeprof.capture.session import COMPILED_WEIGHTS_NOTE
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
    plain = getattr(model, "_compiled_call", None)
    assert plain is not None
    compiled = _capture(model, tmp_path / "compiled", cache_implementation="static", compile_config=_compile_config())
    assert compiled.equals(eager)
    assert sorted(compiled["step"].unique().to_list()) == [0, 1, 2, 3, 4, 5]
    assert COMPILED_WEIGHTS_NOTE in Trace.open(tmp_path / "compiled").manifest.notes, "decode steps did not run compiled"
    # The model's own compiled code is kept, not re-traced after the capture.
    assert model._compiled_call is plain
    assert "get_compiled_call" not in vars(model)
    before = dict(counters["stats"])
    model.generate(**INPUTS, cache_implementation="static", compile_config=_compile_config())
    assert dict(counters["stats"]) == before


def test_each_capture_compiles_one_graph_and_frees_it(model, tmp_path):
    """The capture's compiled step is one graph (its bookkeeping runs around it, not in graph breaks);
    captures in a row each record every step, past dynamo's recompile limit, and leave no graph behind."""
    compiled = dict(cache_implementation="static", compile_config=_compile_config())
    model.generate(**INPUTS, **compiled)
    gc.collect()
    graphs = sum(isinstance(o, torch.fx.GraphModule) for o in gc.get_objects())
    for i in range(torch._dynamo.config.recompile_limit + 2):
        before = counters["stats"]["unique_graphs"]
        with moeprof.capture(model, tmp_path / str(i), force=True, eos_token_id=None) as rec:
            model.generate(**INPUTS, **compiled)
            model.generate(**INPUTS, **compiled)
        assert rec.rows == 2 * 2 * (3 + 5 + 2 * 5), i
        assert counters["stats"]["unique_graphs"] == before + 1, i
        assert COMPILED_WEIGHTS_NOTE in rec.manifest.notes, i
    del rec
    gc.collect()
    assert sum(isinstance(o, torch.fx.GraphModule) for o in gc.get_objects()) == graphs


_HOOK_GUARD = re.compile(r"source=L\['fn'\]\.__self__((?:\._modules\['[^']+'\])*)\.(_(?:forward|backward)(?:_pre)?_hooks(?:_with_kwargs)?), accessed_by")


def _guarded_hook_dicts(model, code) -> list[tuple[str, int]]:
    """(module path, hooks in the dict) for every module hook dict guarded by the compiled code dynamo
    keeps for ``code``."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    entries = _debug_get_cache_entry_list(code)
    assert entries, "no compiled code"
    out = []
    for entry in entries:
        for chain, attr in _HOOK_GUARD.findall(str(entry.guard_manager)):
            path = ".".join(re.findall(r"\['([^']+)'\]", chain))
            out.append((path, len(getattr(model.get_submodule(path), attr))))
    return out


def test_the_captures_compiled_code_does_not_check_module_hooks_each_step(model, tmp_path, monkeypatch):
    """The capture's own compiled call is compiled without guards on empty module hook dicts (its
    hooks stay as they are until its code is dropped at close): checking six dicts of every module
    each step cost about 45 µs for the 12-layer Qwen3 shape on an H200. The dicts holding the
    capture's hooks are still guarded, and anything else compiled during the capture still guards
    them all."""
    compiled = dict(cache_implementation="static", compile_config=_compile_config())

    def guarded(out) -> list[tuple[str, int]]:
        with moeprof.capture(model, out, force=True, eos_token_id=None) as rec:
            model.generate(**INPUTS, **compiled)
            assert torch._dynamo.config.skip_nnmodule_hook_guards is False
            got = _guarded_hook_dicts(model, rec._compiled[2])
        assert rec.rows == 2 * (3 + 5 + 2 * 5)
        return got

    lean = guarded(tmp_path / "lean")
    assert lean and all(hooks > 0 for _, hooks in lean), lean
    # the same capture with those guards left in, as before 94965bf: the empty dicts are guarded too
    from moeprof.capture.session import Recorder

    drop = Recorder._own_hook_guards_dropped

    def keep_empty(self, entries):
        kept = drop(self, entries)
        return [keep or entry.guard_type == "EMPTY_NN_MODULE_HOOKS_DICT" for keep, entry in zip(kept, entries)]

    monkeypatch.setattr(Recorder, "_own_hook_guards_dropped", keep_empty)
    full = guarded(tmp_path / "guarded")
    assert sum(hooks == 0 for _, hooks in full) > 4 * len(lean), (len(lean), len(full))


def test_the_captures_compiled_call_leaves_dynamo_settings_alone_each_step(model, tmp_path, monkeypatch):
    """The empty hook dicts' guards are dropped by the capture's guard filter when its code is compiled,
    not by turning ``skip_nnmodule_hook_guards`` on around each step (4.2–4.8 µs on a CPU, before every launch):
    no dynamo setting is written while compiled steps run, and the setting stays off for the capture."""
    compiled = dict(cache_implementation="static", compile_config=_compile_config())
    with moeprof.capture(model, tmp_path / "t", force=True, eos_token_id=None) as rec:
        model.generate(**INPUTS, **compiled)  # traced and compiled here
        config_type = type(torch._dynamo.config)  # the class of torch's config modules
        write = config_type.__setattr__
        writes = []

        def watched(module, name, value):
            writes.append(name)
            write(module, name, value)

        monkeypatch.setattr(config_type, "__setattr__", watched)
        model.generate(**INPUTS, **compiled)
        monkeypatch.undo()
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False
    assert writes == [], writes
    assert rec.rows == 2 * 2 * (3 + 5 + 2 * 5)


_CLOSURE_GUARD = re.compile(r"L\['fn'\]\.__self__((?:\._modules\['[^']+'\])*)\.(_forward(?:_pre)?_hooks)\[.*?\]\.__closure__")


def _hooks_with_guarded_closures(code) -> set[str]:
    """Module paths whose hooks' closures the compiled code dynamo keeps for ``code`` checks."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    out = set()
    for entry in _debug_get_cache_entry_list(code):
        for line in str(entry.guard_manager).splitlines():
            m = _CLOSURE_GUARD.search(line)
            if m and "cell_contents" in line:
                out.add(".".join(re.findall(r"\['([^']+)'\]", m.group(1))))
    return out


def test_the_captures_compiled_code_does_not_check_what_its_hooks_close_over(model, tmp_path, monkeypatch):
    """What the capture's hooks close over (sink, routing points, ordinals, the recorder) does not change
    while its compiled code lives: those guards are dropped (about 18 lines of guard tree a MoE layer,
    checked before every step). A hook dict that also holds a hook of someone else keeps them all, and the trace is the same."""
    compiled = dict(cache_implementation="static", compile_config=_compile_config())

    class State:
        scale = 1

    state = State()

    def theirs(module, *args):  # read through its closure: dynamo guards state.scale
        if state.scale != 1:
            raise AssertionError("changed")

    def guarded(out) -> tuple[set[str], str, pl.DataFrame]:
        with moeprof.capture(model, out, force=True, eos_token_id=None) as rec:
            point = rec.layout.points[0]
            register = (point.module.register_forward_pre_hook if point.kind == "experts_input"
                        else point.module.register_forward_hook)
            handle = register(theirs)
            try:
                model.generate(**INPUTS, **compiled)
                got = _hooks_with_guarded_closures(rec._compiled[2])
            finally:
                handle.remove()
        return got, point.path, Trace.open(out).routing().collect()

    lean, shared, trace = guarded(tmp_path / "lean")
    assert lean == {shared}, lean  # only the dict that also holds their hook
    from moeprof.capture.session import Recorder

    monkeypatch.setattr(Recorder, "_own_hook_guards_dropped", lambda self, entries: [True] * len(entries))
    full, _, kept = guarded(tmp_path / "kept")
    assert len(full) > len(lean) + 1 and "" in full, full  # every routing point's hooks and the top-level ones
    assert trace.equals(kept)


def test_compiled_decode_steps_keep_their_bookkeeping_until_after_the_launch(model, tmp_path, monkeypatch):
    """A compiled one-token step of the running batch runs before the capture's bookkeeping for it
    (nothing is decided before its launch; that bookkeeping stood before every CUDA-graph replay, about
    25 µs of an H200 host's step); the prefill's is still done first. The trace is the same either way."""
    from moeprof.capture.session import Recorder

    compiled = dict(cache_implementation="static", compile_config=_compile_config())
    start, order = Recorder._on_forward_start, []

    def logged(self, module, args, kwargs, launched=False):
        order.append((int(kwargs["input_ids"].shape[1]), launched))
        return start(self, module, args, kwargs, launched)

    monkeypatch.setattr(Recorder, "_on_forward_start", logged)
    after = _capture(model, tmp_path / "after", **compiled)
    assert order[0] == (5, False) and order[1:] == [(1, True)] * 5, order
    monkeypatch.setattr(Recorder, "_decoding_on", lambda self, args, kwargs: False)
    order.clear()
    before = _capture(model, tmp_path / "before", **compiled)
    assert order == [(5, False)] + [(1, False)] * 5, order
    assert after.equals(before) and after.height == 2 * (3 + 5 + 2 * 5)  # layers x (prompts + new tokens)


def test_a_static_cache_is_read_once_and_not_kept_alive(model, tmp_path, monkeypatch):
    """The cache's is_compileable (computed over every layer on each read) is read once per static cache,
    not before every step; the recorder holds that cache weakly, so a finished batch's KV cache is freed."""
    from transformers import StaticCache

    reads = []
    real = StaticCache.is_compileable

    def counted(cache):  # reads by the capture only (generate() reads it too)
        if sys._getframe(1).f_globals.get("__name__", "").startswith("moeprof."):  # not the path: a venv may lie under one named so
            reads.append(1)
        return real.fget(cache)

    monkeypatch.setattr(StaticCache, "is_compileable", property(counted))
    with moeprof.capture(model, tmp_path / "t", force=True, eos_token_id=None) as rec:
        model.generate(**INPUTS, cache_implementation="static")
        assert rec._compileable_ref is not None
        gc.collect()
        assert rec._compileable_ref() is None  # generate()'s cache is gone: nothing of the capture kept it
    assert rec.rows == 2 * (3 + 5 + 2 * 5)
    assert 1 <= len(reads) <= 2, len(reads)  # the prefill reads it (6 steps were read 2-3 times each before)


def test_the_captures_compiled_call_kept_past_the_capture_runs_the_models_own(model, tmp_path):
    """A caller that keeps what ``get_compiled_call`` gave during a capture gets the model's own compiled
    call from it afterwards: no bookkeeping of a closed capture, the same logits."""
    batch = dict(input_ids=INPUTS["input_ids"], attention_mask=INPUTS["attention_mask"])
    with moeprof.capture(model, tmp_path / "t", force=True, eos_token_id=None):
        kept = model.get_compiled_call(_compile_config())
    with torch.no_grad():
        got = kept(**batch).logits
        want = model(**batch).logits
    assert "get_compiled_call" not in vars(model)
    torch.testing.assert_close(got, want)


def test_compiled_weights_are_flagged_in_the_manifest(model, tmp_path):
    """Weights read from compiled steps come with a note (capture's hooks are part of that graph);
    ids only, a static cache without compiling, and eager decoding come without it."""
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


def _recorded_in_a_callers_compiled_module(model, tmp_path, run) -> None:
    """``run(call, rec)`` in a capture, calling the model through a caller's module, eagerly and compiled:
    two forwards recorded (2 MoE layers x 8 real tokens each), the same rows both ways."""
    batch = dict(input_ids=INPUTS["input_ids"], attention_mask=INPUTS["attention_mask"])

    def forwards(out, fn):
        with moeprof.capture(model, out, force=True, eos_token_id=None) as rec:
            with torch.no_grad():
                run(lambda: fn(**batch), rec)
        assert rec.rows == 2 * 2 * 8
        return Trace.open(out).routing().sort("request_id", "pos", "layer").collect().select(KEY)

    eager = forwards(tmp_path / "eager", _Outer(model))
    torch._dynamo.reset()
    compiled = forwards(tmp_path / "compiled", torch.compile(_Outer(model), backend="aot_eager"))
    assert compiled.equals(eager)


def test_hooks_run_eagerly_inside_a_callers_compiled_module(model, tmp_path):
    """Called inside a caller's compiled module (dynamo inlines the model's call and meets capture's
    top-level hooks there), the capture records each forward once, the same rows as eagerly."""
    def run(call, rec):
        call()
        call()

    _recorded_in_a_callers_compiled_module(model, tmp_path, run)


def test_pause_and_resume_inside_a_callers_compiled_module(model, tmp_path):
    """A caller's compiled module around the model: a paused call takes the capture's hooks off from
    inside the compiled code (at its graph break into the top-level hook), the next runs without them,
    and after resume() the capture records as before: the recorded forwards equal eager ones."""
    def run(call, rec):
        call()
        rec.pause()
        call()
        call()
        assert not model._forward_pre_hooks
        rec.resume()
        call()

    _recorded_in_a_callers_compiled_module(model, tmp_path, run)


def test_a_kept_compiled_call_runs_the_models_own_for_a_paused_batch(model, tmp_path):
    """A caller that keeps the capture's compiled call and starts a batch through it while paused gets
    the model's own compiled code (the capture's, with its hooks off the model, would be compiled again);
    resumed, the kept call records again with nothing compiled."""
    from torch._dynamo.utils import counters

    config = _compile_config()
    batch = dict(input_ids=INPUTS["input_ids"], attention_mask=INPUTS["attention_mask"])
    with torch.no_grad():
        want = model.get_compiled_call(config)(**batch).logits  # the model's own, compiled for these inputs
        with moeprof.capture(model, tmp_path / "t", force=True, eos_token_id=None) as rec:
            kept = model.get_compiled_call(config)
            kept(**batch)
            frames = counters["frames"]["total"]
            rec.pause()
            got = kept(**batch).logits
            assert not model._forward_pre_hooks
            rec.resume()
            kept(**batch)
            assert counters["frames"]["total"] == frames
    assert rec.rows == 2 * 2 * 8  # 2 recorded forwards x 2 MoE layers x 8 real tokens
    torch.testing.assert_close(got, want)
