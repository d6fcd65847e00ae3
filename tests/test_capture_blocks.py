"""Decode steps processed in blocks give the same trace as steps processed one by one.

The host side processes one-token decode steps of the running batch ``block`` at a time, vectorised
(moeprof.capture.session: ``Recorder._process_decode_block``). Every case here runs the same
generation twice, with blocks of 1 (each step on its own, the reference path) and of several steps,
and compares every routing row and every request, in order.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from capture_models import build, cache_kw
from moeprof.capture.session import capture
from moeprof.errors import CaptureError
from moeprof.trace.reader import Trace


@pytest.fixture(scope="module")
def qwen():
    return build("qwen3_moe")


def _record(model, out, block, run, big=None, defer=True, **kw):
    rec = capture(model, out, **kw)
    if block is not None:  # None: the pipe's own choice (up to 128 steps when steps are small)
        rec._pipe._block = rec._pipe._max_block = block
    rec._pipe._defer = defer  # decode steps held by reference and gathered a block at a time
    if big is not None:  # blocks of at least this many bytes are processed by the worker thread
        rec._pipe._big_bytes = big
    with rec, torch.no_grad():
        run()
    trace = Trace.open(out)
    return trace.routing().collect(), trace.requests(), rec.steps


def _same(model, tmp_path, run, blocks=(3, 32), **kw):
    ref = _record(model, tmp_path / "ref", 1, run, defer=False, **kw)
    assert ref[0].height > 0
    # (block, big, defer): blocks in the calling thread; every hand-over to the worker thread; a mix;
    # each step gathered as it ends
    cases = [(b, None, True) for b in blocks] + [(1, 1, True), (4, 1, True), (3, 4000, True), (32, None, False),
                                                 (None, None, True)]
    for block, big, defer in cases:
        got = _record(model, tmp_path / f"b{block}-{big}-{defer}", block, run, big=big, defer=defer, **kw)
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
            out = model(input_ids=nxt, **{cache_kw(model): cache}, use_cache=True)
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
                out = model(input_ids=ids[:, -1:], **{cache_kw(model): cache}, position_ids=torch.full((2, 1), pos),
                            use_cache=True)
    assert rec.steps == 3  # the prefill and the two good decode steps, processed in one block
    routing = Trace.open(tmp_path / "t").routing().collect()
    assert sorted(routing.filter(pl.col("request_id") == 0)["pos"].unique().to_list()) == list(range(8))


def test_pinned_pool_reuses_buffers_by_size_class_and_stays_bounded(monkeypatch):
    from moeprof.capture.pipe import PinnedPool as _PinnedPool

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
            out = model(input_ids=nxt, **{cache_kw(model): cache}, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1).to(torch.int32)

    routing, _, _ = _same(model, tmp_path, loop, weights=False)
    assert routing["weights"].null_count() == routing.height
    first = routing.filter((pl.col("request_id") == 0) & (pl.col("step") == 0)).sort(["layer", "pos"])
    assert first["token_id"].to_list()[:5] == ids[0].tolist()


@pytest.mark.parametrize("wdtype", [None, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("steps", [1, 3])
def test_gathered_steps_decode_to_what_the_layers_gave(wdtype, steps):
    """int32 or int64 expert ids (routers differ), weights in any float dtype or none, one step or a
    deferred group: the host side reads back exactly the values recorded, every part in its place."""
    from types import SimpleNamespace

    from moeprof.capture.pipe import HostPipe

    got = []
    pipe = HostPipe(got.extend, block=steps, defer=True)
    g = torch.Generator().manual_seed(1)
    L, n, k = 3, 4, 2
    want = []
    for t in range(steps + 1):  # the first decode step is never deferred (nothing to compare with yet)
        ids = [torch.randint(0, 60, (n, k), generator=g, dtype=torch.int32 if layer == 1 else torch.int64)
               for layer in range(L)]
        w = None if wdtype is None else [torch.rand(n, k, generator=g).to(wdtype) for _ in range(L)]
        small = [torch.randint(0, 900, (n,), generator=g), torch.arange(n) + t, torch.tensor([1, 0, 1, 1])]
        meta = SimpleNamespace(b=n, s=1, t=t)
        pipe.submit(meta, ids, w, small, deferrable=True)
        want.append((meta, ids, w, small))
    assert pipe._eager  # the second step was seen at new addresses: deferred
    pipe.drain()
    assert [s[0].t for s in got] == list(range(steps + 1))
    for (meta, ids, w, small), (m, gids, gw, tokens, positions, valid) in zip(want, got):
        assert gids.dtype == np.int16
        assert (gids == torch.stack(ids).numpy()).all()
        if w is None:
            assert gw is None
        else:
            assert gw.dtype == np.float32 and (gw == torch.stack(w).float().numpy()).all()
        assert tokens.tolist() == small[0].tolist() and positions.tolist() == small[1].tolist()
        assert valid.reshape(-1).tolist() == [True, False, True, True] and valid.shape == (n, 1)


def test_a_step_at_the_address_of_a_held_one_is_an_error_not_a_wrong_row():
    """A model that writes its routing into one static buffer while decoding eagerly: the pipe sees the
    address come back while holding an earlier step and stops, instead of recording overwritten ids."""
    from types import SimpleNamespace

    from moeprof.capture.pipe import HostPipe

    pipe = HostPipe(lambda steps: None, block=32)
    fresh = [torch.zeros(2, 2, dtype=torch.int64) for _ in range(2)]
    static = torch.zeros(2, 2, dtype=torch.int64)
    small = [torch.zeros(2, dtype=torch.int64)] * 2
    for ids in (fresh[0], fresh[1], static):  # two fresh outputs: deferred from the second on
        pipe.submit(SimpleNamespace(b=2, s=1), [ids], None, small, deferrable=True)
    assert pipe._eager
    with pytest.raises(CaptureError, match="static buffer"):
        pipe.submit(SimpleNamespace(b=2, s=1), [static], None, small, deferrable=True)


def test_the_same_address_every_step_is_never_deferred():
    """CUDA-graph replays return their outputs in the same memory every step: each step is gathered
    and copied as it ends, and every step reads back its own values."""
    from types import SimpleNamespace

    from moeprof.capture.pipe import HostPipe

    got = []
    pipe = HostPipe(got.extend, block=4)
    static = torch.zeros(2, 2, dtype=torch.int64)
    for t in range(6):
        static.fill_(t)  # the replay writes this step's routing over the last one's
        pipe.submit(SimpleNamespace(b=2, s=1), [static], None, [torch.zeros(2, dtype=torch.int64)] * 2,
                    deferrable=True)
        assert pipe._group_kind == "copied" and not pipe._eager  # stacked into a block slot at once
    pipe.drain()
    assert [int(step[1].max()) for step in got] == list(range(6))


def test_decode_steps_of_a_static_cache_are_copied_into_blocks(qwen, tmp_path):
    """Static cache (compiled decoding's): decode steps are never held, each is copied into a block
    buffer as it ends; the trace equals the one gathered step by step."""
    model, _ = qwen
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(7))

    def run():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                       min_new_tokens=40, do_sample=False, pad_token_id=0, cache_implementation="static")

    ref = _same(model, tmp_path, run, blocks=(32,))
    assert ref[2] == 40

    def units(out, max_block=None):
        got = []
        rec = capture(model, tmp_path / out)
        if max_block is not None:
            rec._pipe._max_block = max_block
        orig = rec._pipe._add
        rec._pipe._add = lambda unit: (got.append((len(unit.metas), unit.layout.steps)), orig(unit))
        with rec, torch.no_grad():
            run()
        return got

    # the prefill, then blocks of 32 (the last one partly filled)
    assert units("u32", max_block=32) == [(1, 1), (32, 32), (7, 32)]
    # steps this small (2 tokens x 2 layers) go 128 to a block by default
    assert units("default") == [(1, 1), (39, 128)]


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("wdtype", [None, torch.bfloat16])
def test_copied_decode_steps_read_back_exactly(ids_dtype, wdtype):
    """Decode steps copied into block slots (a static cache): int64 ids share one part with the
    step's small rows (one cat a step, token-major), int32 ids take the three-stack layout; either
    way every step reads back its own values, across more steps than a block holds."""
    from types import SimpleNamespace

    from moeprof.capture.pipe import HostPipe

    got = []
    pipe = HostPipe(got.extend, block=4)
    g = torch.Generator().manual_seed(3)
    b, L, k = 3, 2, 2
    want = []
    for t in range(11):
        ids = [torch.randint(0, 60, (b, k), generator=g).to(ids_dtype) for _ in range(L)]
        w = None if wdtype is None else [torch.rand(b, k, generator=g).to(wdtype) for _ in range(L)]
        small = [torch.randint(0, 900, (b, 1), generator=g), torch.full((b, 1), 40 + t), torch.tensor([[1], [0], [1]])]
        meta = SimpleNamespace(b=b, s=1, t=t)
        pipe.submit(meta, ids, w, small, deferrable=False, decode=True)
        assert pipe._slots[0].fused == (ids_dtype == torch.int64)
        want.append((ids, w, small))
    pipe.drain()
    assert [s[0].t for s in got] == list(range(11))
    for (ids, w, small), (_, gids, gw, tokens, positions, valid) in zip(want, got):
        assert gids.shape == (L, b, k) and (gids == torch.stack(ids).numpy()).all()
        assert gw is None if w is None else (gw == torch.stack(w).float().numpy()).all()
        assert tokens.tolist() == small[0][:, 0].tolist() and positions.tolist() == small[1][:, 0].tolist()
        assert valid.tolist() == [[True], [False], [True]]


def test_small_steps_go_more_to_a_block():
    """Blocks of decode steps: ``block`` steps for big steps, up to ``max_block`` for small ones,
    a block's routing under ``block_bytes``."""
    from moeprof.capture.pipe import HostPipe

    pipe = HostPipe(lambda steps: None, block=32, max_block=128, block_bytes=1 << 20)

    def steps(n, layers=12, k=8):
        ids = [torch.zeros(n, k, dtype=torch.int64)] * layers
        w = [torch.zeros(n, k, dtype=torch.bfloat16)] * layers
        return pipe._block_for(ids, w)

    assert steps(1) == 128  # 960 B a step
    assert steps(8) == 128  # 7.5 KiB
    assert steps(64) == 32 and steps(128, layers=58) == 32  # 60 KiB (17 would fit), 580 KiB: at least 32
    assert steps(12) == (1 << 20) // (12 * 12 * 8 * 10) == 91


def test_a_unit_whose_copy_is_in_flight_waits_for_the_next_hand_over():
    """The launching thread never waits for the GPU to process a unit: a block whose copy has not
    landed (its event not completed) stays pending until a later hand-over finds it landed, or until
    more than four units are pending (each holds a pinned buffer)."""
    from types import SimpleNamespace

    from moeprof.capture.pipe import HostPipe, Layout, _Unit

    class Event:
        def __init__(self):
            self.done = False

        def query(self):
            return self.done

        def synchronize(self):
            raise AssertionError("not called: _finish is replaced below")

    processed = []
    pipe = HostPipe(processed.extend, block=32)
    pipe._finish = lambda taken, event: processed.extend(u.event for u in taken)  # no bytes to decode here

    def unit(steps):
        layout = Layout(steps, 1, 1, 1, torch.int64, None, 2)
        return _Unit([SimpleNamespace()] * steps, layout, torch.zeros(layout.nbytes, dtype=torch.uint8),
                     event=Event(), cuda=True)

    first, prefill = unit(40), unit(1)
    pipe._add(first)
    pipe._add(prefill)  # 40 steps before it, but the block's copy is still in flight
    assert processed == [] and len(pipe._pending) == 2
    first.event.done = prefill.event.done = True
    pipe._add(unit(1))
    assert processed == [first.event, prefill.event]  # landed: handed over, the newest kept
    stuck = [unit(32) for _ in range(5)]
    for u in stuck[:3]:
        pipe._add(u)
    assert len(processed) == 2 and len(pipe._pending) == 4  # in flight: waiting
    pipe._add(stuck[3])  # a fifth pending unit: the four before it are processed (waiting) although in flight
    assert len(processed) == 2 + 4 and pipe._pending == [stuck[3]]
    pipe._add(stuck[4])
    assert len(processed) == 2 + 4 and len(pipe._pending) == 2


def test_buffers_made_inside_inference_mode_can_be_written_outside_it(qwen, tmp_path):
    """The pipe keeps its device buffers, block slots and pinned buffers for reuse (across steps and
    captures): made while the caller ran ``torch.inference_mode()``, they must still take writes
    after it left (a later generate under ``no_grad``, or the closing flush)."""
    from moeprof.capture.pipe import HostPipe, Layout, _views

    layout = Layout(4, 2, 3, 2, torch.int64, torch.bfloat16, 3)
    with torch.inference_mode():
        _, v_ids, _, _ = _views(layout, torch.device("cpu"), (3, 1))
        pipe = HostPipe(lambda steps: None, block=4)
        slots = pipe._block_slots(((3, 1), 3, 2, torch.Size([3, 2]), torch.int64, None, torch.device("cpu")), 4)
    torch.stack([torch.ones(3, 2, dtype=torch.int64)] * 8, out=v_ids)
    torch.cat([torch.ones(3, 2, dtype=torch.int64)] * 2 + [torch.ones(3, 1, dtype=torch.int64)] * 3, dim=1,
              out=slots[2][1][0])

    model, _ = qwen
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    rec = capture(model, tmp_path / "t")
    with rec:
        with torch.inference_mode():
            model.generate(**kw)
        with torch.no_grad():
            model.generate(**kw)
    assert rec.steps == 12 and Trace.open(tmp_path / "t").num_routing_rows == rec.rows


@pytest.mark.parametrize("cache", [None, "static"])  # decode steps held (eager), copied (static cache)
def test_a_block_is_cut_once_its_first_step_is_block_seconds_old(qwen, tmp_path, cache):
    """Slow steps do not wait for 128 others: a block goes to the host once its first step is
    ``block_seconds`` old, so a killed capture loses at most about that much plus the writer's flush."""
    model, _ = qwen
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(7))
    got = []
    rec = capture(model, tmp_path / "t")
    rec._pipe._block_seconds = 0.0  # every step is old at once: blocks of one step
    orig = rec._pipe._add
    rec._pipe._add = lambda unit: (got.append(len(unit.metas)), orig(unit))
    with rec, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                       do_sample=False, pad_token_id=0, cache_implementation=cache)
    assert got == [1] * 8 and rec.steps == 8
    assert Trace.open(tmp_path / "t").num_routing_rows == rec.rows
