"""CPU overhead of capture: tokens/s of greedy generate() with and without capture on a tiny model.

Runs alternate (plain, captured, plain, captured, ...) so that drift in machine load hits both
alike; reports the median of each and their ratio, and writes JSON to bench/results/.

    python bench/capture_overhead.py [--runs 7] [--batch 8] [--prompt 64] [--new 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moeprof.capture.session import capture


def tiny_model(seed: int = 0) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=16, num_experts_per_tok=4, max_position_embeddings=1024,
        pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="runs of each kind")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "capture_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (args.batch, args.prompt), generator=g)
    tokens = args.batch * (args.prompt + args.new)

    def generate() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    generate()  # warm-up
    plain, captured, rows = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            plain.append(tokens / generate())
            with capture(model, Path(tmp) / f"t{i}") as rec:
                captured.append(tokens / generate())
            rows = rec.rows
            trace_bytes = sum(s.bytes for s in rec.manifest.shards if s.kind == "routing")
    p, c = statistics.median(plain), statistics.median(captured)
    result = {
        "benchmark": "capture_overhead_cpu",
        "model": "Qwen3-MoE random, hidden 128, 4 layers, 16 experts, top-4",
        "batch": args.batch, "prompt_tokens": args.prompt, "new_tokens": args.new, "runs": args.runs,
        "threads": args.threads,
        "tokens_per_s_plain_median": round(p, 1), "tokens_per_s_captured_median": round(c, 1),
        "slowdown_ratio": round(p / c, 4), "overhead_percent": round((p / c - 1) * 100, 2),
        "plain_runs": [round(x, 1) for x in plain], "captured_runs": [round(x, 1) for x in captured],
        "routing_rows_per_run": rows, "routing_bytes_per_run": trace_bytes,
        "bytes_per_token_layer": round(trace_bytes / rows, 2) if rows else None,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"generate() tokens/s, median of {args.runs} alternating runs "
          f"(batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, {args.threads} thread):")
    print(f"  without capture {p:9.1f}")
    print(f"  with capture    {c:9.1f}")
    print(f"  ratio           {p / c:9.3f}  ({(p / c - 1) * 100:+.1f}% time)")
    print(f"  trace           {rows} rows, {trace_bytes} bytes, {trace_bytes / max(rows, 1):.2f} B per token-layer")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
