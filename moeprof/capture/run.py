"""Run a workload through ``generate()`` under capture: what ``moeprof capture`` does.

Loading is offline only: a local directory, or a name already in the local Hugging Face cache
(``local_files_only=True``). Generation is greedy (``do_sample=False``) and seeded, so the same
model and workload give the same trace.

Without ``--model`` / ``--prompts`` the shipped tiny model and sample workload are used
(``moeprof/sample_data/tiny-moe`` and ``prompts.jsonl``); where those are absent, a tiny
random-weight Qwen3-MoE built from its config class with a byte-level tokenizer, and a small
built-in workload, stand in, and the summary says so.
"""

from __future__ import annotations

import importlib

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from moeprof.capture.workload import Prompt, parse_workload, read_workload
from moeprof.errors import CaptureError, CaptureInterrupted, Terminated, UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")
BATCHING = ("static", "continuous")

BUILTIN_WORKLOAD = """\
{"domain": "code", "text": "def fibonacci(n):\\n    if n < 2:\\n        return n\\n", "dataset": "builtin"}
{"domain": "code", "text": "for (int i = 0; i < n; ++i) { sum += a[i]; }", "dataset": "builtin"}
{"domain": "math", "text": "Solve for x: 3x + 7 = 22. First subtract 7 from both sides.", "dataset": "builtin"}
{"domain": "math", "text": "The integral of x^2 from 0 to 3 equals", "dataset": "builtin"}
{"domain": "chat", "messages": [{"role": "user", "content": "Hi! Can you suggest a name for my cat?"}], "dataset": "builtin"}
{"domain": "chat", "messages": [{"role": "user", "content": "What should I cook tonight?"}], "dataset": "builtin"}
{"domain": "general", "text": "The river wound through the valley, past fields of barley and old stone walls.", "dataset": "builtin"}
{"domain": "general", "text": "In 1969 the first humans walked on the Moon.", "dataset": "builtin"}
"""


@dataclass
class CaptureSummary:
    out: Path
    model: str
    architecture: str | None
    requests: int
    domains: dict[str, int]
    prompt_tokens: int
    decode_tokens: int
    rows: int
    moe_layers: list[int]
    dense_layers: list[int]
    num_experts: int
    top_k: int
    num_shared_experts: int
    seconds: float
    trace_bytes: int
    complete: bool
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return (self.prompt_tokens + self.decode_tokens) / self.seconds if self.seconds > 0 else 0.0


def sample_path(name: str) -> Path | None:
    """A file or directory of the shipped ``moeprof/sample_data``, or None when it is not there."""
    from moeprof.sample_data import path

    return path(name)


def resolve_model(model: str | None, device: str, dtype: str) -> tuple[Any, Any, str, list[str]]:
    """Load ``(model, tokenizer, name, notes)``; ``None`` means the embedded default."""
    if model is not None:
        m, tok = load_pretrained(model, device, dtype)
        return m, tok, model, []
    shipped = sample_path("tiny-moe")
    if shipped is not None and (shipped / "config.json").exists():
        m, tok = load_pretrained(str(shipped), device, dtype)
        return m, tok, "sample_data/tiny-moe", []
    m, tok = tiny_random_qwen3_moe(device)
    note = (
        "no --model given and the shipped tiny model (sample_data/tiny-moe) is not installed: "
        "captured a tiny RANDOM-WEIGHT Qwen3-MoE built from its config class (routing is not meaningful)"
    )
    return m, tok, "tiny-random-qwen3-moe", [note]


def resolve_prompts(prompts: str | Path | None, limit: int | None) -> tuple[list[Prompt], str, list[str]]:
    if prompts is not None:
        return read_workload(prompts, limit=limit), str(prompts), []
    shipped = sample_path("prompts.jsonl")
    if shipped is not None:
        return read_workload(shipped, limit=limit), "sample_data/prompts.jsonl", []
    note = "no --prompts given and sample_data/prompts.jsonl is not installed: used the built-in 8-prompt workload"
    return parse_workload(BUILTIN_WORKLOAD.splitlines(), source="<builtin>", limit=limit), "<builtin>", [note]


def load_pretrained(ref: str, device: str, dtype: str) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local path or the local HF cache, never the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # moeprof draws its own progress bar
    torch_dtype = _torch_dtype(dtype)
    path = Path(ref).expanduser()
    looks_like_path = path.is_absolute() or ref.startswith((".", "~")) or path.exists() or ref.count("/") > 1
    if looks_like_path and not path.exists():
        raise CaptureError(f"--model {ref}: no such directory")
    if path.exists() and not (path / "config.json").exists():
        raise CaptureError(f"--model {ref}: not a Hugging Face model directory (no config.json in it)")
    source = str(path) if path.exists() else ref
    try:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        where = "directory" if path.exists() else "name (looked up in the local Hugging Face cache only; moeprof never downloads)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"--model {ref}: cannot load this model {where}: {first}") from None
    return model.to(_device(device)).eval(), tokenizer


def tiny_random_qwen3_moe(device: str = "cpu", seed: int = 0) -> tuple[Any, Any]:
    """A 2-layer, 8-expert, top-2 Qwen3-MoE with random weights and a byte-level tokenizer."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = byte_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    model.config._name_or_path = "tiny-random-qwen3-moe"
    return model.to(_device(device)).eval(), tokenizer


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte symbols + ``<pad>``, ``<eos>``) built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<eos>": 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def require_capture_extra() -> None:
    """Raise :class:`CaptureError` saying how to install torch and transformers if either is missing."""
    missing = []
    for name in ("torch", "transformers"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise CaptureError(
            f"capture needs {' and '.join(missing)}, which this installation lacks: "
            "pip install 'moeprof[capture]' (on a CPU-only machine run `pip install torch==2.13.0` first "
            "to get the CPU wheel); analyze, place, report and the other commands work without them"
        )


def run_capture(
    out: str | Path,
    *,
    model: str | None = None,
    prompts: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    device: str = "cpu",
    dtype: str = "auto",
    force: bool = False,
    limit: int | None = None,
    batching: str = "static",
    threads: int | None = None,
    progress: Callable[[int, int, int, float], None] | None = None,
) -> CaptureSummary:
    """Capture the routing of ``generate()`` over a workload into trace ``out``.

    ``batching="static"`` runs ``generate()`` on batches of ``batch_size`` prompts (left-padded);
    ``"continuous"`` runs transformers' continuous batching (paged attention, what ``transformers
    serve`` runs) with up to ``batch_size`` requests in flight, prefills and decode tokens packed
    into shared forward passes.

    ``threads`` sets torch's intra-op threads on the CPU; None takes half the cores (at least 1):
    on a machine shared with other jobs, spinning OpenMP threads on every core made the tiny
    model's generate() 20-40x slower (measured on 2 cores: 1.0 s with 1 thread, 20-40 s with 2).

    ``progress(done, total, rows, tokens_per_second)`` is called as requests finish: requests done,
    requests in all, routing rows so far and the tokens recorded per second of capture.
    """
    require_capture_extra()
    import torch

    from moeprof.capture.session import capture

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if batching not in BATCHING:
        raise UsageError(f"--batching {batching!r}: choose one of {', '.join(BATCHING)}")
    # Check the cheap things before loading a model.
    workload, workload_name, notes = resolve_prompts(prompts, limit)
    from moeprof.outputs import check_target

    check_target(out, force)  # a file, someone else's folder, a read-only place: said before the model loads
    if threads is None:
        import os

        threads = max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    lm, tokenizer, model_name, model_notes = resolve_model(model, device, dtype)
    notes = model_notes + notes

    tokenizer.padding_side = "left"  # decoder-only generation: pad on the left
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts = [p.render(tokenizer) for p in workload]
    settings = {
        "model": model_name,
        "workload": workload_name,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "batching": batching,
        "threads": threads,
        "padding_side": "left" if batching == "static" else None,
        "workload_ids": [p.id for p in workload] if any(p.id is not None for p in workload) else None,
    }
    torch.manual_seed(0)
    started = time.perf_counter()
    dev = next(lm.parameters()).device
    rec = capture(lm, out, force=force, settings=settings)
    try:
        with rec:
            rec.manifest.notes.extend(notes)

            def report(done: int) -> None:
                if progress is not None:
                    tokens = rec.rows // max(1, len(rec.layout.points))  # one row per token per MoE layer
                    progress(done, len(workload), rec.rows, tokens / max(time.perf_counter() - started, 1e-9))

            if batching == "continuous":
                _continuous(lm, tokenizer, rec, workload, texts, batch_size, max_new_tokens, pad_id, report)
            else:
                for start in range(0, len(workload), batch_size):
                    batch = workload[start : start + batch_size]
                    batch_texts = texts[start : start + batch_size]
                    for prompt, text in zip(batch, batch_texts):
                        rec.new_request(domain=prompt.domain, dataset=prompt.dataset, text=text)
                    enc = tokenizer(batch_texts, return_tensors="pt", padding=True, add_special_tokens=True)
                    with torch.inference_mode():
                        lm.generate(
                            input_ids=enc["input_ids"].to(dev),
                            attention_mask=enc["attention_mask"].to(dev),
                            max_new_tokens=max_new_tokens,
                            do_sample=False,
                            num_beams=1,
                            pad_token_id=pad_id,
                        )
                    report(start + len(batch))
    except (KeyboardInterrupt, Terminated) as stop:
        m = rec.manifest
        err = CaptureInterrupted(
            f"{'terminated' if isinstance(stop, Terminated) else 'interrupted'}: kept {rec.rows:,} routing rows "
            f"of {rec.steps:,} forward steps ({len(rec._requests):,} requests) in {out}, marked "
            f"incomplete ({len([s for s in m.shards if s.kind == 'routing'])} shards); "
            f"`moeprof inspect {out}` shows it, and analyze reads it as it is"
        )
        if isinstance(stop, Terminated):
            err.exit_code = 143
        raise err from None
    seconds = time.perf_counter() - started
    manifest = rec.manifest
    reqs = list(rec._requests.values())
    domains: dict[str, int] = {}
    for r in reqs:
        domains[r.label.domain] = domains.get(r.label.domain, 0) + 1
    info = manifest.model
    return CaptureSummary(
        out=Path(out),
        model=model_name,
        architecture=info.architecture,
        requests=len(reqs),
        domains=dict(sorted(domains.items())),
        prompt_tokens=sum(r.prompt_tokens for r in reqs),
        decode_tokens=sum(r.decode_tokens for r in reqs),
        rows=rec.rows,
        moe_layers=list(info.moe_layers),
        dense_layers=list(info.dense_layers),
        num_experts=info.num_experts,
        top_k=info.top_k,
        num_shared_experts=info.num_shared_experts,
        seconds=seconds,
        trace_bytes=sum(s.bytes for s in manifest.shards),
        complete=manifest.complete,
        notes=list(manifest.notes),
    )


def _continuous(lm, tokenizer, rec, workload, texts, batch_size, max_new_tokens, pad_id, report) -> None:
    """Run the workload through transformers' continuous batching, each request labelled by key."""
    import inspect

    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    inputs = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
    page = 16
    longest = max(len(i) for i in inputs) + max_new_tokens
    # A cache sized for the requests in flight; left to itself, transformers sizes it from free
    # memory (90% of it), which on a CPU machine means most of the RAM.
    size_key = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters else "block_size"
    config = ContinuousBatchingConfig(
        num_blocks=batch_size * (-(-longest // page) + 1) + 8,
        max_batch_tokens=max(256, page),
        max_requests_per_batch=batch_size,
        use_cuda_graph=False,
        **{size_key: page},
    )
    eos = getattr(lm.generation_config, "eos_token_id", None)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos)
    with torch.inference_mode():
        manager = lm.init_continuous_batching(generation_config=gen, continuous_batching_config=config)
        manager.start()
        try:
            for i, (prompt, text, ids) in enumerate(zip(workload, texts, inputs)):
                key = f"moeprof-{i}"
                rec.new_request(domain=prompt.domain, dataset=prompt.dataset, text=text, key=key)
                manager.add_request(ids, request_id=key, max_new_tokens=max_new_tokens)
            done = 0
            while done < len(inputs):
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise CaptureError("capture: transformers' continuous batching stopped before every request finished")
                    continue
                if result.error:
                    raise CaptureError(f"capture: request {result.request_id} failed in continuous batching: {result.error}")
                if result.is_finished():
                    done += 1
                    report(done)
        finally:
            manager.stop(block=True)


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return "auto" if name == "auto" else getattr(torch, name)


def _device(name: str) -> Any:
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return dev
