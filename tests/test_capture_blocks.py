"""Decode steps processed in blocks give the same trace as steps processed one by one.

The host side processes one-token decode steps of the running batch ``block`` at a time, vectorised
(moeprof.capture.session: ``Recorder._process_decode_block``). Every case here runs the same
generation twice, with blocks of 1 (each step on its own, the reference path) and of several steps,
and compares every routing row and every request, in order.
"""

from __future__ import annotations

import polars as pl
import pytest
import torch

from capture_models import build
from moeprof.capture.session import capture
from moeprof.errors import CaptureError
from moeprof.trace.reader import Trace


@pytest.fixture(scope="module")
def qwen():
    return build("qwen3_moe")


def _record(model, out, block, run, big=None, **kw):
    rec = capture(model, out, **kw)
    rec._pipe._block = block
    if big is not None:  # blocks of at least this many bytes are processed by the worker thread
        rec._pipe._big_bytes = big
    with rec, torch.no_grad():
        run()
    trace = Trace.open(out)
    return trace.routing().collect(), trace.requests(), rec.steps


def _same(model, tmp_path, run, blocks=(3, 32), **kw):
    ref = _record(model, tmp_path / "ref", 1, run, **kw)
    assert ref[0].height > 0
    # (block, big): blocks in the calling thread; every hand-over to the worker thread; a mix
    for block, big in [(b, None) for b in blocks] + [(1, 1), (4, 1), (3, 4000)]:
        got = _record(model, tmp_path / f"b{block}-{big}", block, run, big=big, **kw)
        assert got[0].equals(ref[0]), f"routing rows differ with blocks of {block} (worker from {big} bytes)"
        assert got[1].equals(ref[1]), f"requests differ with blocks of {block} (worker from {big} bytes)"
        assert got[2] == ref[2]
    return ref


def test_blocks_match_step_by_step_with_eos_and_left_padding(qwen, tmp_path):
    model, _ = qwen
    ids = torch.randint(1, 96, (3, 7), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    mask[2, :1] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    free = model.generate(input_ids=ids, **kw)
    eos = int(free[0, 7 + 4])  # row 0's fifth generated token ends it mid-block
    routing, requests, _ = _same(
        model, tmp_path, lambda: model.generate(input_ids=ids, eos_token_id=eos, **kw), eos_token_id=[eos]
    )
    # the case is real: a request ended early and the others kept going
    decode = requests.sort("request_id")["decode_tokens"].to_list()
    assert min(decode) < max(decode)
    assert routing["step"].max() >= 5


def test_blocks_match_step_by_step_in_an_own_loop_without_positions(qwen, tmp_path):
    model, _ = qwen
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(2))

    def loop():
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(9):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)

    routing, _, steps = _same(model, tmp_path, loop)
    assert steps == 10
    assert routing.filter(pl.col("request_id") == 0)["pos"].max() == 5 + 9 - 1


@pytest.mark.parametrize("block, big", [(32, None), (2, 1)], ids=["calling-thread", "worker-thread"])
def test_a_bad_decode_step_inside_a_block_keeps_the_steps_before_it(qwen, tmp_path, block, big):
    model, _ = qwen
    ids = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    rec = capture(model, tmp_path / "t")
    rec._pipe._block = block
    if big is not None:
        rec._pipe._big_bytes = big
    with pytest.raises(CaptureError, match=r"batch row 0 has position_ids 9, but its previous step ended at 7"):
        with rec, torch.no_grad():
            out = model(input_ids=ids, position_ids=torch.arange(6).expand(2, 6), use_cache=True)
            cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
            for pos in (6, 7, 9, 10):  # the third decode step skips position 8
                out = model(input_ids=ids[:, -1:], past_key_values=cache, position_ids=torch.full((2, 1), pos),
                            use_cache=True)
    assert rec.steps == 3  # the prefill and the two good decode steps, processed in one block
    routing = Trace.open(tmp_path / "t").routing().collect()
    assert sorted(routing.filter(pl.col("request_id") == 0)["pos"].unique().to_list()) == list(range(8))


def test_pinned_pool_reuses_buffers_by_size_class_and_stays_bounded(monkeypatch):
    from moeprof.capture.session import _PinnedPool

    made = []

    def allocate(size):  # plain memory: pinning needs a CUDA build; the bookkeeping is what is tested
        made.append(size)
        return torch.zeros(size, dtype=torch.uint8)

    pool = _PinnedPool(max_bytes=1 << 16)
    monkeypatch.setattr(pool, "_allocate", allocate)
    a, b, c = pool.take(5000), pool.take(100), pool.take(40000)
    assert made == [8192, 4096, 65536]
    for buf in (a, b, c):  # buffers of different sizes and equal contents: never compared by value
        pool.give(buf)
    assert pool.take(3000) is b and pool.take(6000) is a  # c did not fit under the bound: dropped
    assert pool.take(40000) is not c
    assert made == [8192, 4096, 65536, 65536]
    pool.give(a)
    pool.give(b)
    assert pool._bytes == 8192 + 4096 <= 1 << 16


def test_without_weights_and_with_int32_token_ids(qwen, tmp_path):
    """The packed step's dtype does not depend on the inputs' (int32 ids, no weights: still int64)."""
    model, _ = qwen
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(4), dtype=torch.int32)

    def loop():
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        nxt = out.logits[:, -1:].argmax(-1).to(torch.int32)
        for _ in range(4):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1).to(torch.int32)

    routing, _, _ = _same(model, tmp_path, loop, weights=False)
    assert routing["weights"].null_count() == routing.height
    first = routing.filter((pl.col("request_id") == 0) & (pl.col("step") == 0)).sort(["layer", "pos"])
    assert first["token_id"].to_list()[:5] == ids[0].tolist()


@pytest.mark.parametrize("weights", [False, True])
def test_pack_has_one_dtype_whatever_the_routers_give(weights):
    """int32 expert ids (some routers), int32 tokens, bool validity: packed as int64, or float32 with weights."""
    from moeprof.capture.session import StepSink

    sink = StepSink(2, weights)
    sink.reset()
    for layer in range(2):
        ids = torch.tensor([[3, 1], [2, 0]], dtype=torch.int32) + layer
        sink.record(layer, ids, torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.bfloat16))
    packed = sink.pack(torch.tensor([7, 9], dtype=torch.int32), None, torch.tensor([True, False]))
    assert packed.dtype == (torch.float32 if weights else torch.int64)
    n_ids = 2 * 2 * 2
    assert packed[:n_ids].tolist() == [3, 1, 2, 0, 4, 2, 3, 1]
    assert packed[-4:].tolist() == [7, 9, 1, 0]  # tokens, then validity
    if weights:
        assert packed[n_ids : 2 * n_ids].tolist() == [0.75, 0.25, 0.5, 0.5] * 2
