"""Compiled decoding on a GPU (static cache, torch.compile, CUDA graphs): is the routing stacked inside
the graph what the layers computed, and what do dynamo's module-hook guards cost a step?

    python bench/gpu_compiled_check.py

1. Faithful: one capture in which each compiled step hands back both the in-graph stack and the
   per-layer tensors it was stacked from; every step compares them (same replay, same values).
2. Stacked vs per-layer captures: their routing (ids, weights) and the tokens generate() returned.
   The two variants trace different graphs, so the compiler may round the router differently.
3. Guards: plain compiled generate() with dynamo's module-hook guards off (its default) and on (what
   capture sets while it runs), alternating; then capture with them on and off.
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, "bench")
from gpu_capture import build  # noqa: E402
from gpu_grid import routing_values  # noqa: E402

import moeprof  # noqa: E402
from moeprof.capture import session as S  # noqa: E402

model = build("qwen3", 12, None)
from transformers.generation.configuration_utils import CompileConfig  # noqa: E402

ids = torch.randint(10, 1000, (1, 64), generator=torch.Generator().manual_seed(1)).cuda()
inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
KW = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0, cache_implementation="static",
          compile_config=CompileConfig(fullgraph=False, mode="reduce-overhead"))


def gen():
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(**inputs, **KW)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


gen()
# 1. faithful, within one replay
orig_stack = S.StepSink._stack_in_graph
orig_end = S.Recorder._on_forward_end
checked = {"steps": 0, "different": 0}


def stack_and_keep(self):
    keep = list(self.ids), list(self.w) if self.weights else None
    orig_stack(self)
    if self.stacked is not None:
        self.kept = keep


def end_and_compare(self, module, args, kwargs, output):
    sink = self._sink
    if sink.active and sink.stacked is not None:
        ids, w = sink.kept
        same = torch.equal(sink.stacked[0], torch.stack(ids))
        if w[0] is not None:
            same = same and torch.equal(sink.stacked[1], torch.stack(w))
        checked["steps"] += 1
        checked["different"] += not same
    return orig_end(self, module, args, kwargs, output)


S.StepSink._stack_in_graph, S.Recorder._on_forward_end = stack_and_keep, end_and_compare
S.StepSink.kept = None
with tempfile.TemporaryDirectory() as d:
    with moeprof.capture(model, Path(d) / "t", force=True, eos_token_id=None):
        gen()
        gen()
S.StepSink._stack_in_graph, S.Recorder._on_forward_end = orig_stack, orig_end
print(f"1. in-graph stack == the per-layer tensors of the same replay: {checked['steps']} compiled steps compared, "
      f"{checked['different']} different", flush=True)

# 2. stacked vs per-layer captures
res = {}
with tempfile.TemporaryDirectory() as d:
    for name, flag in (("per-layer", False), ("stacked", True), ("per-layer-2", False), ("stacked-2", True)):
        S.StepSink.in_graph = flag
        with moeprof.capture(model, Path(d) / name, force=True, eos_token_id=None):
            out, _ = gen()
        res[name] = (out.cpu(), routing_values(Path(d) / name))
S.StepSink.in_graph = True
for a, b in (("per-layer", "stacked"), ("per-layer", "per-layer-2"), ("stacked", "stacked-2")):
    (ta, ra), (tb, rb) = res[a], res[b]
    ea, eb = ra.column("experts").to_pylist(), rb.column("experts").to_pylist()
    diff_rows = sum(x != y for x, y in zip(ea, eb))
    wa = torch.tensor(ra.column("weights").to_pylist())
    wb = torch.tensor(rb.column("weights").to_pylist())
    print(f"2. {a} vs {b}: rows {ra.num_rows}/{rb.num_rows}, rows with other experts {diff_rows}, "
          f"max |weight diff| {float((wa - wb).abs().max()):.3g}, same tokens generated {torch.equal(ta, tb)}", flush=True)

# 3. guards: code compiled under each setting (dynamo reads it when it compiles)
import torch._dynamo as dynamo  # noqa: E402


def timed(n=3):
    return statistics.median(gen()[1] for _ in range(n))


times = {True: [], False: []}
for r in range(3):
    for skip in (True, False):
        dynamo.reset()
        dynamo.config.skip_nnmodule_hook_guards = skip
        gen()  # compiles: untimed
        times[skip].append(timed())
dynamo.config.skip_nnmodule_hook_guards = True
print(f"3. plain compiled generate, 64 steps: module-hook guards off {statistics.median(times[True]) * 1e3:.1f} ms "
      f"{sorted(round(t * 1e3, 1) for t in times[True])}, on {statistics.median(times[False]) * 1e3:.1f} ms "
      f"{sorted(round(t * 1e3, 1) for t in times[False])}", flush=True)

# 4. capture with the guards on (as it runs) and off
prepare = S.Recorder._prepare_for_compile
cap = {"on": [], "off": [], "plain": []}
with tempfile.TemporaryDirectory() as d:
    for r in range(3):
        dynamo.reset()
        gen()
        cap["plain"].append(timed())
        for guards in ("on", "off"):
            if guards == "off":
                S.Recorder._prepare_for_compile = lambda self: (prepare(self), setattr(dynamo.config, "skip_nnmodule_hook_guards", True))
            with moeprof.capture(model, Path(d) / f"{guards}{r}", force=True, eos_token_id=None):
                gen()  # capture drops older compiled code: recompiles, untimed
                cap[guards].append(timed())
            S.Recorder._prepare_for_compile = prepare
            dynamo.config.skip_nnmodule_hook_guards = True
print("4. 64-step generate: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms {sorted(round(t * 1e3, 1) for t in v)}"
                                           for k, v in cap.items()), flush=True)
