"""Capture overhead at real model dimensions on a GPU (issue 7).

Builds models of real dimensions with random bf16 weights from transformers config classes (no
download), runs ``generate()`` with and without ``moeprof.capture`` in alternating order, and reports
generated tokens per second (median of the runs), the overhead as a ratio, the GPU memory capture
adds, and whether every step was recorded. Writes a JSON under ``bench/results/``.

    python bench/gpu_capture.py --model qwen3 --layers 12 --batch-sizes 1,64 --mode eager
    python bench/gpu_capture.py --model deepseek --layers 3 --batch-sizes 1,64 --mode eager
    python bench/gpu_capture.py --model qwen3 --layers 12 --batch-sizes 64,1 --mode compiled

Modes: ``eager`` (dynamic KV cache, the default of generate) and ``compiled`` (static KV cache with
torch.compile and CUDA graphs, ``mode="reduce-overhead"``, as transformers compiles decode steps).
In compiled mode a capture session's hooks are new to the compiled code, so the session's first
call re-traces (reported as ``session_retrace_seconds``); the timed capture call is the session's
second, which still records the CUDA graphs anew (4-7 ms on an H200): ``bench/gpu_grid.py`` times the
third call, the steady state of a long capture. Throughput counts generated tokens (batch x new tokens) over the whole ``generate()`` call, prefill
included. Random routers route near-uniformly; overhead does not depend on which experts are chosen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an older tree can be timed

import moeprof  # noqa: E402


def qwen3_config(layers: int):
    from transformers import Qwen3MoeConfig

    # Qwen3-30B-A3B dimensions; only the layer count is reduced.
    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )


def deepseek_config(layers: int):
    from transformers import DeepseekV3Config

    # DeepSeek-V3 dimensions (MLA, 256 routed + 1 shared expert, top-8 of 8 groups limited to 4);
    # only the layer count is reduced. Layer 0 is dense as in the real model.
    return DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=layers, first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )


def build(name: str, layers: int, experts_implementation: str | None):
    from transformers import AutoModelForCausalLM

    cfg = qwen3_config(layers) if name == "qwen3" else deepseek_config(layers)
    torch.manual_seed(0)
    if experts_implementation:
        cfg._experts_implementation = experts_implementation
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if name == "deepseek":
        # generate() switches grouped_mm to batched_mm for decode steps on GPUs; batched_mm gathers a
        # copy of each routed expert's weights per token, 15 GB per layer at DeepSeek-V3's size and
        # batch 64. Keep grouped_mm, as an engine would.
        model._optimize_model_for_decode = contextlib.nullcontext
    if experts_implementation:
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(experts_implementation)
        for module in model.modules():  # older transformers: every experts module reads its config
            cfg_m = getattr(module, "config", None)
            if cfg_m is not None and hasattr(cfg_m, "_experts_implementation"):
                cfg_m._experts_implementation = experts_implementation
    print(f"experts implementation: {getattr(model.config, '_experts_implementation', None)}", flush=True)
    model.eval()
    # Routers of random models: give them a realistic spread so top-k is not a tie-break.
    for n, p in model.named_parameters():
        if n.endswith("gate.weight"):
            p.data.normal_(0, 0.02)
    return model


class GraphWork:
    """Counts the CUDA graphs recorded (cudagraph trees' ``record_function``) and the graphs dynamo
    compiled, so that a timed call that did either is known. A capture session records the graphs of
    its compiled decode steps anew in its first calls, and on some runs still in the third
    (cudagraph trees' debug log: "Re-recording ... static input data pointer changed"), a one-time
    cost per session that a long capture does not pay per call."""

    def __init__(self) -> None:
        self.records = 0  # CUDA graphs recorded
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.CUDAGraphTreeManager
        record = manager.record_function

        def counted(tree_manager, *args, **kwargs):
            self.records += 1
            return record(tree_manager, *args, **kwargs)

        manager.record_function = counted

    @staticmethod
    def compiled() -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    def mark(self) -> int:
        """Grows when a graph is recorded or compiled."""
        return self.records + self.compiled()


def generate_once(model, inputs, new_tokens, compiled):
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if compiled:
        from transformers.generation.configuration_utils import CompileConfig

        kw.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=False, mode="reduce-overhead"))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(**inputs, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_batch(model, batch, prompt, new_tokens, runs, compiled, workdir):
    g = torch.Generator(device="cpu").manual_seed(batch)
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt), generator=g).cuda()
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    # Warm-up: both arms, so compilation and allocator growth are not timed.
    generate_once(model, inputs, new_tokens, compiled)
    with moeprof.capture(model, workdir / "warm", force=True, eos_token_id=None):
        generate_once(model, inputs, new_tokens, compiled)
    plain, captured, mem_plain, mem_cap, retrace = [], [], [], [], []
    rows_expected = None
    for i in range(runs):
        for arm in ("plain", "capture") if i % 2 == 0 else ("capture", "plain"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            if arm == "plain":
                if compiled:  # the same untimed first call as the capture arm: switching variants costs
                    generate_once(model, inputs, new_tokens, compiled)
                plain.append(generate_once(model, inputs, new_tokens, compiled))
                mem_plain.append(torch.cuda.max_memory_allocated() - base)
            else:
                out = workdir / f"run{i}"
                with moeprof.capture(model, out, force=True, eos_token_id=None) as rec:
                    if compiled:
                        # A new capture session's hooks are new guards: the first compiled call of a
                        # session re-traces once. Time the steady state (a later call), and the
                        # one-time cost apart.
                        first = generate_once(model, inputs, new_tokens, compiled)
                    captured.append(generate_once(model, inputs, new_tokens, compiled))
                    if compiled:
                        retrace.append(first - captured[-1])
                mem_cap.append(torch.cuda.max_memory_allocated() - base)
                manifest = json.loads((out / "manifest.json").read_text())
                rows = sum(s["rows"] for s in manifest["shards"] if s["kind"] == "routing")
                steps = pq.read_table(out / manifest["shards"][0]["path"], columns=["step"]).column("step")
                n_moe = len(manifest["model"]["moe_layers"])
                rows_expected = n_moe * batch * (prompt + new_tokens - 1) * (2 if compiled else 1)
                bytes_routing = sum(s["bytes"] for s in manifest["shards"] if s["kind"] == "routing")
    tok = batch * new_tokens
    med_p, med_c = statistics.median(plain), statistics.median(captured)
    return {
        "batch": batch,
        "prompt_tokens": prompt,
        "new_tokens": new_tokens,
        "runs_per_arm": runs,
        "seconds_plain": plain,
        "seconds_capture": captured,
        "tokens_per_s_plain": tok / med_p,
        "tokens_per_s_capture": tok / med_c,
        "overhead_ratio": med_c / med_p,
        "session_retrace_seconds": statistics.median(retrace) if retrace else None,
        "peak_gpu_bytes_plain": max(mem_plain),
        "peak_gpu_bytes_capture": max(mem_cap),
        "capture_extra_gpu_bytes": max(mem_cap) - max(mem_plain),
        "rows_recorded": rows,
        "rows_expected": rows_expected,
        "every_step_recorded": rows == rows_expected,
        "max_step_in_first_shard": int(max(steps.to_pylist())),
        "routing_bytes_per_row": bytes_routing / rows if rows else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["qwen3", "deepseek"], default="qwen3")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    ap.add_argument(
        "--experts-implementation", default=None,
        help="transformers experts kernel (eager, batched_mm, grouped_mm); default: transformers' choice, "
        "grouped_mm for deepseek (batched_mm gathers weights per token and runs out of memory at its size)",
    )
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_capture-MODEL-MODE.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_capture.py needs a CUDA GPU")
    import transformers

    t0 = time.perf_counter()
    impl = args.experts_implementation or ("grouped_mm" if args.model == "deepseek" else None)
    model = build(args.model, args.layers, impl)
    build_s = time.perf_counter() - t0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in (int(x) for x in args.batch_sizes.split(",")):
            r = bench_batch(model, b, args.prompt, args.new_tokens, args.runs, args.mode == "compiled", Path(tmp) / f"b{b}")
            results.append(r)
            print(
                f"{args.model} x{args.layers} {args.mode} batch {b}: {r['tokens_per_s_plain']:.0f} tok/s plain, "
                f"{r['tokens_per_s_capture']:.0f} with capture, overhead {100 * (r['overhead_ratio'] - 1):+.2f}%, "
                f"extra GPU memory {r['capture_extra_gpu_bytes'] / 2**20:.1f} MiB, "
                f"rows {r['rows_recorded']}/{r['rows_expected']}",
                flush=True,
            )
    report = {
        "model": args.model,
        "layers": args.layers,
        "mode": args.mode,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model_build_seconds": build_s,
        "experts_implementation": getattr(model.config, "_experts_implementation", impl),
        "parameters": sum(p.numel() for p in model.parameters()),
        "results": results,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"gpu_capture-{args.model}-{args.mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
