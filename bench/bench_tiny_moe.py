"""How fast the shipped tiny MoE runs on this machine's CPU (prints figures; asserts nothing).

Usage:
    HF_HUB_OFFLINE=1 python bench/bench_tiny_moe.py                    # 2 threads, batch 16, 32 new tokens
    HF_HUB_OFFLINE=1 python bench/bench_tiny_moe.py --workload 400     # also: the first 400 workload prompts, 24 new tokens each

Figures:
- model directory size on disk, and the time to load tokenizer + model (float32) with no network;
- greedy generate for one batch of 16 workload prompts (left-padded): prefill tokens, new tokens,
  wall seconds, new tokens/s and total (prompt + new) tokens/s;
- with --workload N: wall seconds to run N prompts in batches of 16 with --workload-new-tokens each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts(path: Path, tokenizer, n: int) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[:n]:
        rec = json.loads(line)
        if "messages" in rec:
            out.append(tokenizer.apply_chat_template(rec["messages"], tokenize=False, add_generation_prompt=True))
        else:
            out.append(rec["text"])
    return out


def generate(model, tokenizer, texts: list[str], new_tokens: int) -> tuple[int, int, float]:
    """(prompt tokens, generated tokens, seconds) for one greedy batch."""
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - t
    return int(enc["attention_mask"].sum()), int((out.shape[1] - enc["input_ids"].shape[1]) * len(texts)), seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "sample_data" / "tiny-moe")
    p.add_argument("--prompts", type=Path, default=ROOT / "sample_data" / "prompts.jsonl")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--workload", type=int, default=0, help="also run the first N workload prompts")
    p.add_argument("--workload-new-tokens", type=int, default=24)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    size = sum(f.stat().st_size for f in args.model.iterdir() if f.is_file())
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    print(f"model dir {args.model}: {size / 1e6:.2f} MB on disk; {type(model).__name__}, "
          f"{sum(x.numel() for x in model.parameters()) / 1e6:.2f} M parameters; load {load_s:.2f} s; "
          f"{args.threads} threads")

    texts = prompts(args.prompts, tokenizer, args.batch)
    generate(model, tokenizer, texts[:2], 2)  # warm-up
    n_prompt, n_new, seconds = generate(model, tokenizer, texts, args.new_tokens)
    print(f"greedy generate, batch {args.batch}: {n_prompt} prompt tokens + {n_new} new tokens in {seconds:.2f} s "
          f"= {n_new / seconds:.0f} new tokens/s, {(n_prompt + n_new) / seconds:.0f} tokens/s in all")

    if args.workload:
        texts = prompts(args.prompts, tokenizer, args.workload)
        t = time.perf_counter()
        totals = [0, 0]
        for i in range(0, len(texts), args.batch):
            a, b, _ = generate(model, tokenizer, texts[i:i + args.batch], args.workload_new_tokens)
            totals[0] += a
            totals[1] += b
        seconds = time.perf_counter() - t
        print(f"workload: {len(texts)} prompts ({totals[0]} prompt tokens) + {args.workload_new_tokens} new tokens each "
              f"in batches of {args.batch}: {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
