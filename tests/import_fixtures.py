"""Small dumps in each engine's exact structure (dict keys, tensor shapes, JSON fields as the engines write them).

Each builder returns the path it wrote and documents the known answer the tests check.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np

# -- SGLang (python/sglang/srt/eplb/expert_distribution.py) -----------------------------------------
# 3 model layers (layer 0 dense: never calls on_select_experts, stays -1), 6 physical experts holding
# 4 logical ones: physical 4 -> logical 0, physical 5 -> logical 1 (replicas).
SGL_P2L = [[0, 1, 2, 3, 0, 1]] * 3


def _topk(layers: dict[int, list[list[int]]], n_tok: int):
    import torch

    t = torch.full((3, n_tok, 8), -1, dtype=torch.int32)  # _DetailSinglePassGatherer buffer, reset to -1
    for lay, rows in layers.items():
        t[lay, : len(rows), : len(rows[0])] = torch.tensor(rows, dtype=torch.int32)
    return t


def _record(fid, input_ids, positions, extend_seq_lens, mode, layers):
    import torch

    n = len(input_ids)
    return dict(
        forward_pass_id=fid,
        rank=0,
        gatherer_key="primary",
        input_ids=input_ids,
        positions=positions,
        extend_seq_lens=extend_seq_lens,
        forward_mode=mode,
        topk_ids_of_layer=_topk(layers, n),
        misc_objects=[],
        global_physical_count=torch.zeros((3, 6), dtype=torch.int32),
    )


def sglang_per_token(path: Path) -> Path:
    """Passes: 0 warm-up (4 identical tokens), 5 EXTEND of 2 sequences, 6 DECODE of 2 tokens, 7 MIXED, 8 IDLE."""
    import torch

    warm = {1: [[2, 3]] * 4, 2: [[1, 0]] * 4}
    extend = {  # 5 tokens: sequence A = tokens 0-2, sequence B = tokens 3-4; token 4 padded (-1) in layer 2
        1: [[1, 4], [1, 2], [3, 5], [2, 1], [0, 3]],
        2: [[5, 2], [3, 0], [1, 4], [2, 3], [-1, -1]],
    }
    decode = {1: [[4, 3], [1, 0]], 2: [[2, 5], [0, 1]]}
    records = [
        _record(0, [0, 0, 0, 0], [0, 1, 2, 3], [4], 1, warm),
        _record(5, [11, 12, 13, 21, 22], [0, 1, 2, 0, 1], [3, 2], 1, extend),
        _record(6, [14, 23], [3, 2], None, 2, decode),
        _record(7, [15, 24, 25], [4, 3, 0], [1, 2], 3, {1: [[0, 1]] * 3, 2: [[0, 1]] * 3}),
        _record(8, [], [], None, 4, {}),
    ]
    torch.save(dict(records=records, last_physical_to_logical_map=torch.tensor(SGL_P2L)), path)
    return path


def sglang_per_pass(path: Path) -> Path:
    import torch

    phys = torch.zeros((3, 6), dtype=torch.int32)
    phys[1] = torch.tensor([3, 1, 0, 2, 4, 0])  # logical: 0 -> 3+4=7, 1 -> 1, 3 -> 2
    rec = dict(forward_pass_id=9, rank=0, gatherer_key="primary", global_physical_count=phys)
    torch.save(dict(records=[rec], last_physical_to_logical_map=torch.tensor(SGL_P2L)), path)
    return path


def sglang_stat(path: Path) -> Path:
    """_StatAccumulator.dump: logical_count (passes=3, layers=3, experts=4); row 2 unfilled (zeros)."""
    import torch

    c = torch.zeros((3, 3, 4), dtype=torch.int32)
    c[0, 1] = torch.tensor([5, 0, 2, 1])
    c[0, 2] = torch.tensor([0, 3, 3, 2])
    c[1, 1] = torch.tensor([1, 1, 1, 1])
    torch.save(dict(rank=0, logical_count=c, average_utilization_rate_over_window=None), path)
    return path


# -- vLLM (vllm/entrypoints/openai/completion/protocol.py, vllm/outputs.py) --------------------------
# 3 layers (layer 0 dense: zeros in RoutedExpertsCapturer's buffer), top-2. Prompt of 3 tokens,
# 3 generated tokens -> 5 rows (num_tokens - 1).
VLLM_ROUTES = np.array(
    [
        [[0, 0], [1, 5], [2, 7]],
        [[0, 0], [3, 1], [6, 4]],
        [[0, 0], [2, 2 + 1], [0, 1]],
        [[0, 0], [7, 6], [5, 2]],
        [[0, 0], [4, 0], [1, 3]],
    ],
    dtype=np.uint8,
)


def _npy_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def vllm_openai(path: Path) -> Path:
    """Two CompletionResponse bodies, one per line: routed_experts as base64 .npy (current vLLM)."""
    lines = []
    for i, rid in enumerate(("cmpl-aaa", "cmpl-bbb")):
        routes = VLLM_ROUTES if i == 0 else VLLM_ROUTES[:, :, ::-1]
        lines.append(
            {
                "id": rid,
                "object": "text_completion",
                "created": 1,
                "model": "Qwen/Qwen3-30B-A3B",
                "choices": [
                    {
                        "index": 0,
                        "text": "abc",
                        "finish_reason": "length",
                        "token_ids": [104, 105, 106],
                        "prompt_token_ids": [101, 102, 103],
                        "routed_experts": _npy_b64(routes.copy()),
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
            }
        )
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def vllm_split(path: Path) -> Path:
    """vLLM v0.21: response-level prompt_routed_experts + per-choice routed_experts, nested int lists."""
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "prompt_routed_experts": VLLM_ROUTES[:3].tolist(),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                     "routed_experts": VLLM_ROUTES[3:].tolist()}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }
    path.write_text(json.dumps(body, indent=2))
    return path


def vllm_offline(path: Path) -> Path:
    """RequestOutput saved from LLM.generate: outputs[i].routed_experts [seq_len, layer_num, topk]."""
    rec = {
        "request_id": "0",
        "prompt_token_ids": [101, 102, 103],
        "outputs": [{"index": 0, "text": "abc", "token_ids": [104, 105, 106],
                     "routed_experts": VLLM_ROUTES.astype(np.int32).tolist()}],
    }
    path.write_text(json.dumps(rec) + "\n")
    return path


# -- Megatron (megatron/core/transformer/moe/router_trace.py, megatron/training/activation_logging.py)
def megatron_trace(path: Path) -> Path:
    """router_trace_rank0.jsonl: steps 0 and 1, layers 1 and 3, plus one MTP record (skipped)."""
    recs = []
    tops = {
        (0, 1): [[12, 5], [3, 7], [0, 1]],
        (0, 3): [[2, 4], [6, 1], [5, 5 + 2]],
        (1, 1): [[9, 8]],
        (1, 3): [[1, 0]],
    }
    for (step, layer), top in tops.items():
        recs.append({"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": 0,
                     "num_tokens": len(top), "topk": 2, "top_indices": top})
        if (step, layer) == (0, 3):
            recs.append({"step": 0, "stage": "pre_dispatch", "block": "mtp", "layer": 0, "rank": 0,
                         "num_tokens": 1, "topk": 2, "top_indices": [[4, 2]], "mtp_idx": 0})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def megatron_tpe(path: Path) -> Path:
    """tokens_per_expert/rank0.jsonl: iter 100, layers 3 and 5, two micro-batches of 2 local experts."""
    recs = [
        {"iter": 100, "block": "decoder", "layer": 3, "tpe": [[128, 64], [96, 80]]},
        {"iter": 100, "block": "decoder", "layer": 5, "tpe": [[10, 182], [0, 176]]},
        {"iter": 100, "block": "mtp", "mtp_idx": 0, "layer": 1, "tpe": [[50, 50]]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# -- per-token JSONL (hook logs) ---------------------------------------------------------------------
def hook_jsonl(path: Path, *, warmup: bool = True) -> Path:
    """A meta line, 2 warm-up rows with no request id, then requests r1 (3 tokens) and r2 (dummy: 4
    identical tokens), 2 layers, top-2 with weights."""
    lines = [{"model": "toy-moe", "num_experts": 8, "top_k": 2}]
    if warmup:
        for layer in (0, 1):
            lines.append({"req_id": None, "token_idx": 0, "layer": layer, "topk_ids": [1, 2], "topk_weights": [0.5, 0.5]})
    for t, (phase, e) in enumerate([("prefill", [0, 3]), ("prefill", [5, 1]), ("decode", [7, 2])]):
        for layer in (0, 1):
            lines.append({"req_id": "r1", "token_idx": t, "layer": layer, "topk_ids": [e[0], (e[1] + layer) % 8],
                          "topk_weights": [0.75, 0.25], "phase": phase})
    for t in range(4):
        for layer in (0, 1):
            lines.append({"req_id": "r2", "token_idx": t, "layer": layer, "topk_ids": [4, 6],
                          "topk_weights": [0.5, 0.5], "phase": "prefill"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def expert_selection(root: Path, *, tar: bool = False) -> Path:
    """Two requests of the public expert-selection layout under ``tag-math/`` and ``tag-code/``:
    layers 0 (dense, null), 1 and 3 (MoE, top-2); request math/0 has a 3-token prefill and 2 decode
    steps, code/5 a 2-token prefill and 1 decode step. With ``tar``, the same as ``root.tar.gz``."""
    import tarfile

    files = {
        "tag-math/0.json": [
            {"0": None, "1": [[1, 2], [3, 4], [1, 5]], "3": [[0, 7], [6, 2], [2, 3]]},
            {"0": None, "1": [[4, 1]], "3": [[7, 0]]},
            {"0": None, "1": [[5, 6]], "3": [[1, 2]]},
        ],
        "tag-code/5.json": [
            {"0": None, "1": [[0, 1], [2, 3]], "3": [[4, 5], [6, 7]]},
            {"0": None, "1": [[3, 2]], "3": [[5, 4]]},
        ],
    }
    for name, steps in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(steps))
    if not tar:
        return root
    out = root.with_name(root.name + ".tar.gz")
    with tarfile.open(out, "w:gz") as tf:
        tf.add(root, arcname=".")
    return out


# -- TensorRT-LLM (tensorrt_llm/_torch/expert_statistic.py) ------------------------------------------
def trtllm_statistic(directory: Path, rank: int = 0, *, meta: bool = True) -> Path:
    """EXPERT_STATISTIC_PATH after EXPERT_STATISTIC_ITER_RANGE=100-102: 4 experts (slots), top-2, layers
    1 and 3. Rank r's counts are torch.bincount(...) (int64) of its own tokens, keyed "{iter}_{layer}";
    rank 0 also writes meta_info.json. Rank 1's counts are rank 0's doubled."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    base = {
        "100_1": [3, 0, 1, 2], "100_3": [1, 1, 2, 2],
        "101_1": [0, 4, 0, 2], "101_3": [2, 2, 1, 1],
    }
    save_file({k: np.asarray(v, np.int64) * (rank + 1) for k, v in base.items()}, str(directory / f"rank{rank}.safetensors"))
    if meta and rank == 0:
        (directory / "meta_info.json").write_text(json.dumps({"num_experts": 4, "num_experts_per_token": 2}))
    return directory / f"rank{rank}.safetensors"
