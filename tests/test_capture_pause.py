"""``Recorder.pause()`` / ``resume()``: batches started while paused are not recorded, a running batch is
recorded whole, and what is recorded equals a capture of the same calls alone.

The known answer is the shipped tiny model's own capture of the same ``generate()`` call, made without
any pause. Compiled decoding is taken through transformers' compiled call on the CPU (``aot_eager``).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import polars as pl
import pytest
import torch

from moeprof.capture.session import COMPILED_WEIGHTS_NOTE, capture
from moeprof.errors import CaptureError
from moeprof.sample_data import path
from moeprof.trace.reader import Trace

transformers = pytest.importorskip("transformers")

KEY = ["request_id", "step", "pos", "layer", "token_id"]
NEW = 6


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path("tiny-moe"), attn_implementation="sdpa").eval()


def _inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 500, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    return dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                pad_token_id=0)


def _routing(out) -> pl.DataFrame:
    trace = Trace.open(out, verify="full")
    assert trace.complete
    return trace.routing().collect().sort(KEY)


def _same(got: pl.DataFrame, want: pl.DataFrame) -> None:
    assert got.height == want.height > 0
    for col in KEY:
        assert got[col].to_list() == want[col].to_list(), col
    np.testing.assert_array_equal(np.stack(got["experts"].to_numpy()), np.stack(want["experts"].to_numpy()))


def test_batches_started_while_paused_are_not_recorded(tiny, tmp_path):
    with capture(tiny, tmp_path / "alone", eos_token_id=None) as rec:
        tiny.generate(**_inputs(2))
    alone = _routing(tmp_path / "alone")

    with capture(tiny, tmp_path / "paused", eos_token_id=None) as rec:
        rec.pause()
        assert rec.paused
        tiny.generate(**_inputs(1))
        assert rec.rows == 0 and rec.steps == 0
        rec.resume()
        assert not rec.paused
        tiny.generate(**_inputs(2))
        steps = rec.steps
        rec.pause()
        tiny.generate(**_inputs(3))
        assert rec.steps == steps
    _same(_routing(tmp_path / "paused"), alone)
    assert Trace.open(tmp_path / "paused").requests().height == 2


def test_a_batch_running_when_paused_is_recorded_whole(tiny, tmp_path):
    """pause() called in the middle of a generate() call (here from a stopping criterion, after the
    third step) leaves that batch recorded to its end; the next call is not recorded."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    with capture(tiny, tmp_path / "alone", eos_token_id=None):
        tiny.generate(**_inputs(4))
    alone = _routing(tmp_path / "alone")

    class PauseAtThirdStep(StoppingCriteria):
        def __init__(self, rec):
            self.rec, self.calls = rec, 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            if self.calls == 3:
                self.rec.pause()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with capture(tiny, tmp_path / "mid", eos_token_id=None) as rec:
        tiny.generate(**_inputs(4), stopping_criteria=StoppingCriteriaList([PauseAtThirdStep(rec)]))
        assert rec.paused
        steps = rec.steps
        tiny.generate(**_inputs(5))
        assert rec.steps == steps
    _same(_routing(tmp_path / "mid"), alone)


def test_compiled_decoding_while_paused_runs_the_models_own_compiled_call(tiny, tmp_path):
    compiled = _compiled()
    alone = _routing_alone(tiny, tmp_path, compiled)

    with capture(tiny, tmp_path / "paused", eos_token_id=None) as rec:
        rec.pause()
        tiny.generate(**_inputs(7), **compiled)
        assert rec.steps == 0
        assert rec._compiled is None  # the capture's own compiled call was never handed out
        rec.resume()
        tiny.generate(**_inputs(6), **compiled)
        assert rec._compiled is not None
        steps = rec.steps
        rec.pause()
        tiny.generate(**_inputs(8), **compiled)
        assert rec.steps == steps
    got = _routing(tmp_path / "paused")
    _same(got, alone)


def _hook_dicts(model) -> dict:
    """Every hook dict of every module, as (key, hook) lists in order."""
    names = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
             "_forward_hooks_always_called")
    return {(path, n): list(getattr(m, n).items()) for path, m in model.named_modules() for n in names}


def test_a_paused_batch_runs_with_no_hook_of_the_capture_and_resume_puts_the_same_back(tiny, tmp_path):
    """While a paused batch runs, the model and its MoE layers carry no hook of the capture (a paused
    step costs what a step with no capture costs); resume() puts back the same hooks under the same
    keys in the same order, and what is recorded after it equals a capture of the same call alone."""
    calls = []
    before = _hook_dicts(tiny)
    alone = _routing_alone(tiny, tmp_path, {})
    assert _hook_dicts(tiny) == before

    with capture(tiny, tmp_path / "t", eos_token_id=None) as rec:
        on = _hook_dicts(tiny)
        assert on != before
        rec.pause()
        assert _hook_dicts(tiny) == on  # taken off when a paused batch starts, not before
        theirs = tiny.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
        tiny.generate(**_inputs(1))
        assert calls  # someone else's hook still runs while the capture's are off
        mine_off = _hook_dicts(tiny)
        theirs.remove()
        assert _hook_dicts(tiny) == before
        assert rec.steps == 0
        tiny.generate(**_inputs(2))
        rec.resume()
        assert _hook_dicts(tiny) == on
        tiny.generate(**_inputs(6))
    assert _hook_dicts(tiny) == before
    assert any(k[0] == "model.layers.0" and v for k, v in mine_off.items())  # theirs was there while ours were off
    _same(_routing(tmp_path / "t"), alone)


def test_hooks_added_by_someone_else_while_paused_stay_and_ours_come_back(tiny, tmp_path):
    """A hook someone adds to a module while the capture's are off stays; ours go back after it and
    the capture records as before."""
    alone = _routing_alone(tiny, tmp_path, {})
    calls = []
    with capture(tiny, tmp_path / "t", eos_token_id=None) as rec:
        rec.pause()
        tiny.generate(**_inputs(1))
        theirs = tiny.register_forward_pre_hook(lambda *a: calls.append(1))
        rec.resume()
        keys = list(tiny._forward_pre_hooks)
        assert keys[0] == theirs.id and len(keys) == 2  # theirs, then the capture's pre-hook back
        tiny.generate(**_inputs(6))
        theirs.remove()
    assert calls
    _same(_routing(tmp_path / "t"), alone)


def test_our_hooks_go_back_between_hooks_registered_before_and_after_them(tiny, tmp_path):
    """Hooks of someone else's on both sides of the capture's, in one dict: resume() restores the old order."""
    before = tiny.register_forward_pre_hook(lambda *a: None)
    try:
        with capture(tiny, tmp_path / "t", eos_token_id=None) as rec:
            after = tiny.register_forward_pre_hook(lambda *a: None)
            on = _hook_dicts(tiny)
            rec.pause()
            tiny.generate(**_inputs(1))
            assert list(tiny._forward_pre_hooks) == [before.id, after.id]
            rec.resume()
            assert _hook_dicts(tiny) == on
            tiny.generate(**_inputs(6))
            after.remove()
        _same(_routing(tmp_path / "t"), _routing_alone(tiny, tmp_path, {}))
    finally:
        before.remove()


class _Watched(OrderedDict):
    """A hook dict that notes, after each change, whether every hook of ``theirs`` was in it."""

    def __init__(self) -> None:
        super().__init__()
        self.theirs: set[int] = set()
        self.gaps = 0

    def _note(self) -> None:
        self.gaps += not self.theirs <= set(self)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._note()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._note()

    def pop(self, *args):
        out = super().pop(*args)
        self._note()
        return out

    def clear(self) -> None:
        super().clear()
        self._note()

    def move_to_end(self, *args, **kwargs) -> None:
        super().move_to_end(*args, **kwargs)
        self._note()


def test_putting_ours_back_among_others_never_leaves_theirs_out(tiny, tmp_path):
    """Where the capture's hook sat between someone else's, resume() restores the order without a moment
    in which one of theirs is missing from the dict (a forward in another thread would skip it)."""
    saved = tiny._forward_pre_hooks
    tiny._forward_pre_hooks = watched = _Watched()
    try:
        first = tiny.register_forward_pre_hook(lambda *a: None)
        with capture(tiny, tmp_path / "t", eos_token_id=None) as rec:
            last = tiny.register_forward_pre_hook(lambda *a: None)
            watched.theirs = {first.id, last.id}
            order = list(watched)
            rec.pause()
            tiny.generate(**_inputs(1))
            rec.resume()
            assert list(watched) == order and watched.gaps == 0
            tiny.generate(**_inputs(6))
            last.remove()
            watched.theirs = set()
        first.remove()
    finally:
        tiny._forward_pre_hooks = saved
    _same(_routing(tmp_path / "t"), _routing_alone(tiny, tmp_path, {}))


def test_a_resume_from_another_thread_as_a_paused_batch_starts_leaves_the_hooks_on(tiny, tmp_path, monkeypatch):
    """resume() from another thread after a paused batch has started but before its hooks come off: the
    hooks stay on (that batch still records nothing), and the next batch is recorded. Without the lock
    and the second look at the flag, the hooks came off after resume() had found nothing to put back,
    and every later batch ran without them: nothing recorded, no error."""
    import threading

    from moeprof.capture import session

    take = session.Recorder._take_hooks_off

    def resumed_first(self):
        t = threading.Thread(target=self.resume)
        t.start()
        t.join()
        take(self)

    with capture(tiny, tmp_path / "t", eos_token_id=None) as rec:
        on = _hook_dicts(tiny)
        rec.pause()
        monkeypatch.setattr(session.Recorder, "_take_hooks_off", resumed_first)
        tiny.generate(**_inputs(1))
        monkeypatch.setattr(session.Recorder, "_take_hooks_off", take)
        assert rec.steps == 0 and not rec.paused
        assert _hook_dicts(tiny) == on
        tiny.generate(**_inputs(6))
    _same(_routing(tmp_path / "t"), _routing_alone(tiny, tmp_path, {}))


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_pause_and_resume_from_another_thread_while_batches_run(tiny, tmp_path, mode):
    """A thread runs batches while another pauses and resumes at random moments (seeded): every batch is
    recorded whole or not at all, each recorded one equal to a capture of the same call alone, and the
    hook dicts end as they began. Compiled: the hooks may come back in the middle of a paused batch
    that runs the model's own compiled call."""
    import random
    import threading

    compiled = _compiled() if mode == "compiled" else {}
    runs = 8 if compiled else 16
    alone = _routing_alone(tiny, tmp_path, compiled)
    per_batch = alone.height
    before = _hook_dicts(tiny)
    errors, done = [], threading.Event()
    with capture(tiny, tmp_path / "t", eos_token_id=None) as rec:

        def batches() -> None:
            try:
                for _ in range(runs):
                    tiny.generate(**_inputs(6), **compiled)
            except BaseException as exc:  # pragma: no cover - the failure this test looks for
                errors.append(exc)
            finally:
                done.set()

        worker = threading.Thread(target=batches)
        worker.start()
        rng = random.Random(7)
        while not done.is_set():
            rec.pause() if rng.random() < 0.5 else rec.resume()
            time.sleep(rng.uniform(0, 0.01))
        worker.join()
        rec.resume()
        tiny.generate(**_inputs(6), **compiled)  # the last batch, recorded
    assert not errors, errors
    assert _hook_dicts(tiny) == before
    got = _routing(tmp_path / "t")
    batches_recorded = got.height // per_batch
    assert got.height == batches_recorded * per_batch and 1 <= batches_recorded <= runs + 1
    requests = got.sort("step")["request_id"].unique(maintain_order=True).to_list()
    assert len(requests) == 2 * batches_recorded  # two requests a batch, each whole
    want = alone["request_id"].unique(maintain_order=True).to_list()
    cols = ["pos", "layer", "token_id", "experts"]
    for n, request in enumerate(requests):
        mine = got.filter(pl.col("request_id") == request).sort("pos", "layer")
        ref = alone.filter(pl.col("request_id") == want[n % 2]).sort("pos", "layer")
        assert mine.select(cols).equals(ref.select(cols)), request


def test_hook_handles_that_do_not_name_their_dicts_leave_the_hooks_on(tiny, tmp_path, monkeypatch):
    """A torch whose hook handles do not say which dicts hold their hooks: nothing is taken off, paused
    batches run with the hooks on (they return at once), and the trace is the same."""
    from moeprof.capture import session

    class Handle:  # a handle with an id and remove(), and nothing more
        id = 0

    assert session._HooksOff.take([Handle()]) is None
    monkeypatch.setattr(session._HooksOff, "take", classmethod(lambda cls, handles: None))
    with capture(tiny, tmp_path / "t", eos_token_id=None) as rec:
        on = _hook_dicts(tiny)
        rec.pause()
        tiny.generate(**_inputs(1))
        assert _hook_dicts(tiny) == on and rec.steps == 0
        rec.resume()
        tiny.generate(**_inputs(6))
    _same(_routing(tmp_path / "t"), _routing_alone(tiny, tmp_path, {}))


def test_pausing_and_resuming_compiled_decoding_compiles_nothing_again(tiny, tmp_path):
    """Paused compiled decoding runs the model's own compiled code with no hook of the capture: dynamo
    compiles nothing of the capture's there. Resumed, the capture's own compiled code (which checks no
    hook dict) runs again, so a recorded / paused / recorded sequence compiles nothing after the first
    recorded call, and each recorded call equals a capture of the same call alone."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    compiled = _compiled()
    tiny.generate(**_inputs(11), **compiled)  # the model's own compiled code, made before the capture
    with capture(tiny, tmp_path / "t", eos_token_id=None) as rec:
        tiny.generate(**_inputs(6), **compiled)
        hooks = [*tiny._forward_pre_hooks.values(), *tiny._forward_hooks.values()]
        frames = counters["frames"]["total"]
        for _ in range(2):
            rec.pause()
            for seed in (12, 13):
                tiny.generate(**_inputs(seed), **compiled)
            assert not tiny._forward_pre_hooks and not tiny._forward_hooks
            rec.resume()
            tiny.generate(**_inputs(6), **compiled)
        assert counters["frames"]["total"] == frames
        assert all(_debug_get_cache_entry_list(h.__code__) == [] for h in hooks)
    got = _routing(tmp_path / "t")
    alone = _routing_alone(tiny, tmp_path, compiled)
    n = alone["request_id"].max() + 1
    assert got["request_id"].max() + 1 == 3 * n
    for call in range(3):
        part = got.filter(pl.col("request_id") // n == call).with_columns(pl.col("request_id") - call * n)
        _same(part, alone)


def _compiled() -> dict:
    """generate() arguments for compiled decoding through transformers' compiled call, on the CPU."""
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(backend="aot_eager", fullgraph=False, mode=None)
    config._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=config)


def _routing_alone(tiny, tmp_path, compiled) -> pl.DataFrame:
    """The known answer: the routing of ``_inputs(6)`` captured alone."""
    with capture(tiny, tmp_path / "alone", eos_token_id=None, force=True):
        tiny.generate(**_inputs(6), **compiled)
    return _routing(tmp_path / "alone")


def test_compiled_calls_run_while_paused_do_not_flag_the_recorded_weights(tiny, tmp_path):
    """Only recorded steps decide the manifest's note on compiled weights: a trace whose recorded
    batches ran eagerly carries none, even when compiled calls ran (and compiled) while paused."""
    from transformers.generation.configuration_utils import CompileConfig

    torch._dynamo.reset()
    config = CompileConfig(backend="aot_eager", fullgraph=False, mode=None)
    config._compile_all_devices = True
    with capture(tiny, tmp_path / "t", eos_token_id=None) as rec:
        rec.pause()
        tiny.generate(**_inputs(9), cache_implementation="static", compile_config=config)
        rec.resume()
        tiny.generate(**_inputs(10))
    assert rec.steps > 0
    assert COMPILED_WEIGHTS_NOTE not in Trace.open(tmp_path / "t").manifest.notes


@pytest.mark.parametrize("paused_batch_first", [False, True], ids=["paused", "hooks-off"])
def test_continuous_batching_cannot_be_paused(tiny, tmp_path, paused_batch_first):
    """Refused whether the capture's hooks are still on (pause() asked, no batch run since) or already
    off (a paused generate() ran before): the error comes at close, never rows of the wrong request."""
    cb = getattr(transformers, "ContinuousBatchingConfig", None)
    if cb is None:
        pytest.skip(f"transformers {transformers.__version__} has no continuous batching")
    import inspect

    from transformers import GenerationConfig

    size = "page_size" if "page_size" in inspect.signature(cb).parameters else "block_size"
    config = cb(num_blocks=64, max_batch_tokens=16, use_cuda_graph=False, **{size: 16})
    gen = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    with pytest.raises(CaptureError, match="cannot be paused"):
        with capture(tiny, tmp_path / "cb", eos_token_id=None) as rec:
            rec.pause()
            if paused_batch_first:
                tiny.generate(**_inputs(1))
                assert not tiny._forward_pre_hooks
            tiny.generate_batch(inputs=[[5, 6, 7, 8]], generation_config=gen, continuous_batching_config=config)
    assert rec.rows == 0
