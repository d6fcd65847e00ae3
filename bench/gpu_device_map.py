"""A model spread over two GPUs (``device_map``) captures the same trace as on one GPU (issue 7).

Builds a Qwen3-30B-A3B-shaped model with fewer layers and random bf16 weights, captures a batch of
generate() on one GPU, saves it, reloads it split layer-wise over two GPUs with a ``device_map``,
captures the same inputs again, and compares the two traces row by row.

    python bench/gpu_device_map.py --layers 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moeprof  # noqa: E402
from gpu_capture import build  # noqa: E402

KEYS = ["request_id", "step", "pos", "layer"]


def read_trace(path: Path):
    manifest = json.loads((path / "manifest.json").read_text())
    tables = [pq.read_table(path / s["path"]) for s in manifest["shards"] if s["kind"] == "routing"]
    import pyarrow as pa

    t = pa.concat_tables(tables)
    return t.take(pc.sort_indices(t, sort_keys=[(k, "ascending") for k in KEYS])), manifest


def capture(model, inputs, out: Path):
    with moeprof.capture(model, out, eos_token_id=None):
        model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    return read_trace(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_device_map.json"))
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit("bench/gpu_device_map.py needs two GPUs")
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100000, (args.batch, 64), generator=g)
    ids[0, :7] = 0  # left padding on one row
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build("qwen3", args.layers, None)
        one, m1 = capture(model, dict(input_ids=ids.cuda(), attention_mask=mask.cuda()), tmp / "one")
        model.save_pretrained(tmp / "ckpt")
        del model
        torch.cuda.empty_cache()
        half = args.layers // 2
        device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
        device_map.update({f"model.layers.{i}": 0 if i < half else 1 for i in range(args.layers)})
        split = AutoModelForCausalLM.from_pretrained(tmp / "ckpt", dtype=torch.bfloat16, device_map=device_map)
        split.eval()
        devices = sorted({str(p.device) for p in split.parameters()})
        two, m2 = capture(split, dict(input_ids=ids.to("cuda:0"), attention_mask=mask.to("cuda:0")), tmp / "two")
    same_keys = all(one.column(k).equals(two.column(k)) for k in KEYS)
    e1 = one.column("experts").combine_chunks().flatten().to_numpy()
    e2 = two.column("experts").combine_chunks().flatten().to_numpy()
    k = m1["model"]["top_k"]
    rows_equal = float((e1.reshape(-1, k) == e2.reshape(-1, k)).all(axis=1).mean()) if len(e1) == len(e2) else None
    sets_equal = None
    if len(e1) == len(e2):
        s1, s2 = e1.reshape(-1, k).copy(), e2.reshape(-1, k).copy()
        s1.sort(axis=1)
        s2.sort(axis=1)
        sets_equal = float((s1 == s2).all(axis=1).mean())
    report = {
        "layers": args.layers,
        "batch": args.batch,
        "devices_of_split_model": devices,
        "rows_one_gpu": one.num_rows,
        "rows_two_gpus": two.num_rows,
        "same_rows": same_keys,
        "share_rows_with_identical_ids_in_order": rows_equal,
        "share_rows_with_identical_id_sets": sets_equal,
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
