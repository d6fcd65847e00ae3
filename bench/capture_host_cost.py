"""Where capture's host time goes, per forward step: the launching thread's own cost, by part.

On a GPU in eager mode at small batches, a decode step is bound by the thread that launches kernels:
every microsecond capture spends on that thread lands on the step. This benchmark times, with
``time.perf_counter_ns`` around each of capture's entry points, the host time capture adds per step
(forward-start hook, the per-layer routing hooks, the forward-end hook with its pack and copy, the
host processing of finished steps, the hand-offs to the writer) and prints it next to the step's
own time without capture, as a share of the step.

    python bench/capture_host_cost.py                        # CPU, tiny model, batch 1 and 8
    python bench/capture_host_cost.py --device cuda --model qwen3 --layers 12 --batches 1,8,32

On CPU the step itself runs on the same thread, so the share is an upper bound of what a GPU sees
(there, the kernels run while the host works). Rows are checked against what generate() must give.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an older tree can be timed

from moeprof.capture import session as S  # noqa: E402

PARTS = ("hook_calls", "outside_hooks", "forward_start", "layer_hooks", "forward_end", "pack", "submit", "process", "handoff", "drain")


def _tiny() -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=16, num_experts_per_tok=4, max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).eval()


class Timers:
    """Wraps capture's entry points with nanosecond accumulators (nested parts are not double-counted
    in ``total``: the process and hand-off parts run inside forward_end)."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = defaultdict(int)
        self._saved: list[tuple[object, str, object]] = []
        self.depth = [0]  # top-level hook calls in progress

    def timed(self, fn, part: str):
        ns, depth = self.ns, self.depth

        def timed(*a, **kw):
            t = time.perf_counter_ns()
            outer = part == "hook_calls" or not depth[0]
            depth[0] += part == "hook_calls"
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= part == "hook_calls"
                dt = time.perf_counter_ns() - t
                ns[part] += dt
                if outer and part in ("forward_start", "forward_end"):  # called outside any hook
                    ns["outside_hooks"] += dt

        return timed

    def wrap(self, owner: object, name: str, part: str) -> None:
        self.replace(owner, name, self.timed(getattr(owner, name), part))

    def replace(self, owner: object, name: str, new: object) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def restore(self) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()


def run(model, batch: int, prompt: int, new: int, device: str, reps: int, compiled: bool = False,
        big_bytes: int | None = None) -> dict:
    g = torch.Generator().manual_seed(batch * 7919 + prompt)
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt), generator=g).to(device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if compiled:  # static cache + torch.compile with CUDA graphs, as bench/gpu_capture.py --mode compiled
        from transformers.generation.configuration_utils import CompileConfig

        if device == "cuda":
            cc = CompileConfig(fullgraph=False, mode="reduce-overhead")
        else:  # transformers compiles on GPUs only; on CPU the same path (dynamo, hook guards) through aot_eager
            cc = CompileConfig(backend="aot_eager", fullgraph=False, mode=None)
            cc._compile_all_devices = True
        kw.update(cache_implementation="static", compile_config=cc)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def plain() -> float:
        if compiled:  # after a capture (hooks gone) the first call re-traces, as in the capture arm: untimed
            with torch.inference_mode():
                model.generate(**inputs, **kw)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, **kw)
        sync()
        return time.perf_counter() - t

    plain()  # warm-up (compiled: compiles)
    times_plain, times_cap, per_part = [], [], defaultdict(list)
    L = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(reps):
            times_plain.append(plain())
            timers = Timers()
            # the top-level hooks as torch calls them: S._top_level's functions (this tree), or through
            # torch.compile's guard (S._eager, earlier trees). This tree's own compiled call runs the
            # hooks' work around the compiled step instead: timed as forward_start/forward_end, added
            # to hook_calls where no hook call holds them.
            if hasattr(S, "_top_level"):
                # (the hook inside: the top-level function itself is traced into the capture's graph)
                timers.replace(S, "_top_level", lambda r, hook, _e=S._top_level, _t=timers: _e(r, _t.timed(hook, "hook_calls")))
            else:
                timers.replace(S, "_eager", lambda hook, _e=S._eager, _t=timers: _t.timed(_e(hook), "hook_calls"))
            rec = S.capture(model, Path(tmp) / f"t{r}", force=True, eos_token_id=None)
            if big_bytes is not None:  # blocks of at least this many bytes are processed by the worker thread
                rec._pipe._big_bytes = big_bytes
            timers.wrap(rec, "_on_forward_start", "forward_start")
            timers.wrap(rec, "_on_forward_end", "forward_end")
            name = "_process_steps" if hasattr(rec, "_process_steps") else "_process"  # older trees
            timers.wrap(rec, name, "process")
            timers.wrap(rec, "_write_staged", "handoff")
            if not compiled:  # compiled, the layer hooks are traced into the graph: no Python runs there
                timers.wrap(rec._sink, "record", "layer_hooks")
            if hasattr(rec._sink, "pack"):  # trees before moeprof.capture.pipe packed each step in the sink
                timers.wrap(rec._sink, "pack", "pack")
            else:  # gathering on the device and the copy to the host, a step or a block of steps at a time
                timers.wrap(rec._pipe, "_gather", "pack")
            timers.wrap(rec._pipe, "submit", "submit")
            # the pipe holds the bound method it was made with: point it at the timed one
            rec._pipe._process = getattr(rec, name)
            sync()
            t = time.perf_counter()
            with rec, torch.inference_mode():
                if compiled:  # the capture compiles its own call (earlier trees: re-trace): the first call is untimed
                    model.generate(**inputs, **kw)
                    sync()
                    timers.ns.clear()
                    t = time.perf_counter()
                model.generate(**inputs, **kw)
                t_drain = time.perf_counter_ns()
                rec._pipe.drain()  # steps still pending: a longer capture processes them while running
                timers.ns["drain"] += time.perf_counter_ns() - t_drain
            sync()
            times_cap.append(time.perf_counter() - t)
            timers.restore()
            steps = new  # one prefill and new - 1 decode steps
            L = len(rec.layout.points)
            expected = L * batch * (prompt + new - 1) * (2 if compiled else 1)
            if rec.rows != expected:
                raise SystemExit(f"wrong rows: {rec.rows} != {expected}")
            for part in PARTS:
                per_part[part].append(timers.ns[part] / steps / 1e3)
    step_us = statistics.median(times_plain) / new * 1e6
    med = {p: statistics.median(v) for p, v in per_part.items()}
    # hook_calls: the two top-level hooks as called (forward_start and forward_end inside, which hold
    # pack, submit and the processing of finished blocks); the rest of processing runs at close.
    added = med["hook_calls"] + med["outside_hooks"] + med["layer_hooks"] + med["drain"]
    return dict(batch=batch, prompt=prompt, new=new, layers=L, compiled=compiled, step_us_plain=step_us,
                host_us_per_step=med, added_us_per_step=added, share_of_step=added / step_us,
                wall_ratio=statistics.median(times_cap) / statistics.median(times_plain))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", default="tiny", help="tiny (shipped-size Qwen3-MoE), or qwen3/deepseek (bench/gpu_capture.py)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompts", default="64")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mode", default="eager", choices=("eager", "compiled"),
                    help="compiled: static cache + torch.compile with CUDA graphs (CUDA only)")
    ap.add_argument("--big-bytes", type=float, default=None,
                    help="process blocks of at least this many MiB in the worker thread (default: the pipe's)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.model == "tiny":
        model = _tiny().to(args.device)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu_capture import build

        model = build(args.model, args.layers, "grouped_mm" if args.model == "deepseek" else None)
    import moeprof

    print(f"moeprof from {Path(moeprof.__file__).parent}", flush=True)
    results = []
    for b in map(int, args.batches.split(",")):
        for p in map(int, args.prompts.split(",")):
            r = run(model, b, p, args.new, args.device, args.reps, args.mode == "compiled",
                    None if args.big_bytes is None else int(args.big_bytes * (1 << 20)))
            results.append(r)
            parts = "  ".join(f"{k} {v:7.1f}" for k, v in r["host_us_per_step"].items())
            print(f"batch {b:4d} prompt {p:5d}: step {r['step_us_plain']:9.1f} us  capture adds "
                  f"{r['added_us_per_step']:7.1f} us ({100 * r['share_of_step']:5.2f}% of a step)  [{parts}]  "
                  f"wall ratio {r['wall_ratio']:.3f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(device=args.device, model=args.model, mode=args.mode, torch=torch.__version__,
                                            results=results), indent=1))


if __name__ == "__main__":
    main()
