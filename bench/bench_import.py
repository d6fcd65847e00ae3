"""Import throughput and peak memory: per-token JSONL and Megatron router trace of N rows.

    python bench/bench_import.py --rows 1000000

Prints rows/s and the peak RSS growth; memory must stay flat as --rows grows (the importers stream).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from moeprof.importers import ImportOptions, import_trace


def write_jsonl(path: Path, rows: int, k: int, experts: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, experts, size=(rows, k))
    with open(path, "w") as fh:
        fh.write(json.dumps({"meta": {"model": {"name": "bench", "num_experts": experts, "top_k": k}}}) + "\n")
        for i in range(rows):
            tok = i // 8
            fh.write(json.dumps({"req_id": tok // 256, "token_idx": tok % 256, "layer": i % 8,
                                 "topk_ids": ids[i].tolist(), "topk_weights": [0.125] * k,
                                 "phase": "prefill" if tok % 256 < 200 else "decode"}) + "\n")


def write_megatron(path: Path, rows: int, k: int, experts: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per = 512
    with open(path, "w") as fh:
        for r in range(rows // per):
            top = rng.integers(0, experts, size=(per, k)).tolist()
            fh.write(json.dumps({"step": r // 8, "stage": "pre_dispatch", "block": "decoder", "layer": r % 8,
                                 "rank": 0, "num_tokens": per, "topk": k, "top_indices": top}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name, writer, fmt in (("jsonl", write_jsonl, "jsonl"), ("megatron", write_megatron, "megatron")):
            src = Path(tmp) / f"{name}.jsonl"
            writer(src, args.rows, args.top_k, args.experts)
            size = src.stat().st_size
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            rep = import_trace(fmt, [src], Path(tmp) / f"t-{name}", ImportOptions(num_experts=args.experts))
            dt = time.perf_counter() - t0
            rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f"{name:9s} rows={rep.routing_rows:>9d} input={size / 2**20:7.1f} MiB  "
                  f"{dt:6.2f} s  {rep.routing_rows / dt:>9.0f} rows/s  {size / 2**20 / dt:6.1f} MiB/s  "
                  f"peak RSS growth {max(0, rss1 - rss0) / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
