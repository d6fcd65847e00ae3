"""What dynamo checks before each compiled decode step of a capture: the guard tree of the capture's own code.

Before every step of compiled decoding, dynamo checks the guards of the compiled code it is about to
run; on a GPU with CUDA graphs that check runs before the graph's launch, so its time is the step's.
This benchmark builds a Qwen3-MoE model from its config (random weights, small widths, the layer count
of ``--layers``), compiles decoding with a static cache (``aot_eager`` on CPU), and for the capture's
own compiled code reports the guard tree's size and the time of one check, with the capture's guard
filter (this tree) and without it (every guard kept), sessions alternating in one process. The check
is timed on the arguments of a real decode step, with the recorder's flags as they are inside that
step; the traces of the two variants are compared row for row. The capture's forward-start
bookkeeping of that step, the other host work before a compiled step's launch, is timed too.

    python bench/capture_guard_cost.py                  # 12 layers, 4 sessions
    python bench/capture_guard_cost.py --layers 48 --sessions 6
    python bench/capture_guard_cost.py --fresh          # and a second compilation with no capture

Prints each session's figures, then the median check time of each variant and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an older tree can be timed
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moeprof  # noqa: E402
from moeprof.capture import session  # noqa: E402
from moeprof.trace import Trace  # noqa: E402


def build(layers: int):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _timed_check(guards, f_locals: dict, checks: int) -> tuple[bool, float]:
    """Whether the guard tree passes on ``f_locals``, and one check's time in µs (after 200 untimed)."""
    passes = guards.check(f_locals)
    for _ in range(200):
        guards.check(f_locals)
    t0 = time.perf_counter_ns()
    for _ in range(checks):
        guards.check(f_locals)
    return passes, (time.perf_counter_ns() - t0) / checks / 1e3


def one_session(model, inputs, kw, work: Path, checks: int) -> dict:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    seen = []
    start = session.Recorder._on_forward_start

    def grab(self, module, args, kwargs, launched=False):
        seen.append((args, dict(kwargs)))
        return start(self, module, args, kwargs, launched)

    rec = moeprof.capture(model, work, force=True, eos_token_id=None).start()
    session.Recorder._on_forward_start = grab
    try:
        for _ in range(2):
            model.generate(**inputs, **kw)
    finally:
        session.Recorder._on_forward_start = start
    entries = _debug_get_cache_entry_list(rec._compiled[2])
    guards = entries[0].guard_manager
    args, kwargs = seen[-3]  # a decode step
    f_locals = {"args": args, "kwargs": kwargs, "fn": model.__call__}
    # as inside the step: no grad (generate), the recorder's flags set by the forward's start
    with torch.no_grad():
        rec._in_compiled, rec._sink.active = True, True
        try:
            passes, us = _timed_check(guards, f_locals, checks)
        finally:
            rec._in_compiled, rec._sink.active = False, False
        # the other host work before the launch: the capture's forward-start bookkeeping of that step
        for n in (200, checks):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                rec._on_forward_start(model, args, kwargs)
                rec._meta, rec._sink.active = None, False
        start_us = (time.perf_counter_ns() - t0) / checks / 1e3
    rec.close()
    return dict(entries=len(entries), lines=str(guards).count("\n"), passes=passes, us=us, start_us=start_us,
                rows=Trace.open(work).routing(["step", "pos", "layer", "experts", "token_id"]).collect())


def fresh_check(model, inputs, kw, checks: int) -> dict:
    """The same check for a second compilation of the model's own call made as the capture makes its own
    (``bench/gpu_ab_parts.py``'s ``plain-fresh``: a function of its own, a backend equal to no other), with
    no capture: the guard tree a compiled step has without any hook."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from gpu_ab_parts import _FreshCompile

    seen = []
    grab = model.register_forward_pre_hook(lambda m, a, k: seen.append((a, dict(k))), with_kwargs=True)
    model.generate(**inputs, **kw)
    grab.remove()
    fresh = _FreshCompile(model)
    fresh.resume()
    try:
        model.generate(**inputs, **kw)
    finally:
        fresh.pause()
    entries = _debug_get_cache_entry_list(fresh.fresh._torchdynamo_orig_callable.__code__)
    guards = entries[0].guard_manager
    args, kwargs = seen[-3]
    f_locals = {"args": args, "kwargs": kwargs, "fn": model.__call__}
    with torch.no_grad():
        passes, us = _timed_check(guards, f_locals, checks)
    return dict(entries=len(entries), lines=str(guards).count("\n"), passes=passes, us=us)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--sessions", type=int, default=4, help="capture sessions, alternating the two variants")
    ap.add_argument("--checks", type=int, default=3000, help="timed guard checks per session")
    ap.add_argument("--fresh", action="store_true",
                    help="also time the check of a second compilation of the model's own call, no capture")
    args = ap.parse_args()
    from transformers.generation.configuration_utils import CompileConfig

    model = build(args.layers)
    ids = torch.randint(10, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    cc = CompileConfig(backend="aot_eager", fullgraph=False, mode=None)
    cc._compile_all_devices = True  # compile on CPU too
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, cache_implementation="static",
              compile_config=cc)
    model.generate(**inputs, **kw)
    own = session.Recorder._own_hook_guards_dropped
    scratch = tempfile.TemporaryDirectory(prefix="moeprof-guards-")  # removed at exit, however the run ends
    work = Path(scratch.name)
    results: dict[str, list[dict]] = {"filtered": [], "every guard": []}
    for k in range(args.sessions):
        name = "every guard" if k % 2 else "filtered"
        if k % 2:
            session.Recorder._own_hook_guards_dropped = lambda self, entries: [True] * len(entries)
        try:
            r = one_session(model, inputs, kw, work / str(k), args.checks)
        finally:
            session.Recorder._own_hook_guards_dropped = own
        results[name].append(r)
        print(f"session {k} ({name}): {r['entries']} compiled entry, guard tree {r['lines']:,} lines, "
              f"check passes: {r['passes']}, one check {r['us']:.1f} µs, forward start {r['start_us']:.2f} µs, "
              f"{r['rows'].height} rows", flush=True)
        if args.fresh:
            f = fresh_check(model, inputs, kw, args.checks)
            results.setdefault("fresh", []).append(f)
            print(f"  then a second compilation, no capture: {f['entries']} compiled entry, guard tree "
                  f"{f['lines']:,} lines, check passes: {f['passes']}, one check {f['us']:.1f} µs", flush=True)
    a, b = results["filtered"], results["every guard"]
    same = all(r["rows"].equals(a[0]["rows"]) for r in a + b)
    fa, fb = statistics.median(r["us"] for r in a), statistics.median(r["us"] for r in b)
    print(f"\nQwen3-MoE, {args.layers} layers, capture's compiled decode step: guard check {fa:.1f} µs with the filter, "
          f"{fb:.1f} µs with every guard: {fa / fb:.2f}x ({fb - fa:+.1f} µs a step saved); traces identical: {same}")
    print(f"forward-start bookkeeping of that step (a tight loop): {statistics.median(r['start_us'] for r in a + b):.2f} µs")
    if args.fresh:
        ff = statistics.median(r["us"] for r in results["fresh"])
        print(f"a second compilation of the model's own call, no capture: guard check {ff:.1f} µs "
              f"(the capture's with the filter: {fa / ff:.2f}x)")


if __name__ == "__main__":
    main()
