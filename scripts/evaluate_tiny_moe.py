"""Held-out evidence that the shipped tiny MoE learned something and routes by domain.

Usage:
    python scripts/evaluate_tiny_moe.py                                   # shipped model, shipped workload
    python scripts/evaluate_tiny_moe.py --corpora-dir /path/to/corpora     # also the training sources' validation split

Prints two things, per domain (code, math, chat, general):

1. Language-model loss vs unigram baselines on held-out text, in nats per token: the model's mean
   next-token cross-entropy; the cross-entropy of the domain's unigram model fitted on the training
   split (add-one smoothing; counts shipped in tiny-moe/unigram_counts.npz), the usual baseline; and
   the entropy of the held-out text's own unigram distribution (the best any unigram model could do on
   that very text, an optimistic baseline that small samples flatter further). Held-out text: the
   workload prompts (sample_data/prompts.jsonl, excluded from training; chat prompts rendered with the
   chat template) and, with --corpora-dir, the 5% validation tail of every training source.
2. Domain specialisation of the router: for each MoE layer, p(d, l) = share of the workload's prompt
   tokens' top-k routes that go to each expert (the "expert popularity"); Jensen-Shannon divergence
   (base 2, in [0, 1]) between every pair of domains; the mean over pairs and layers. Compared with
   the same model whose router weights are re-initialised (normal, std = initializer_range, as
   transformers initialises them), mean over --control-seeds seeds, and with the JS between the
   even and odd halves of each domain's prompts (what sampling noise alone gives).

No moeprof capture is used: routes come straight from the model's output_router_logits.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path

import numpy as np

DOMAINS = ("code", "math", "chat", "general")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "sample_data" / "tiny-moe"
DEFAULT_PROMPTS = ROOT / "sample_data" / "prompts.jsonl"


# --------------------------------------------------------------------------- pure statistics (numpy)

def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the empirical unigram distribution of `tokens` (1-D int array)."""
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(counts: np.ndarray, tokens: np.ndarray) -> float:
    """Cross-entropy (nats/token) on `tokens` of the unigram model with add-one smoothed `counts` (V,)."""
    probs = (counts + 1.0) / (counts.sum() + len(counts))
    return float(-np.mean(np.log(probs[tokens])))


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence, base 2 (0 = same distribution, 1 = disjoint supports).

    p, q: (E,) non-negative counts or probabilities; each is normalised here.
    """
    p = np.asarray(p, dtype=np.float64) / np.sum(p)
    q = np.asarray(q, dtype=np.float64) / np.sum(q)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def mean_pairwise_js(popularity: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
    """popularity: {domain: (L, E) route counts}. Returns (mean over pairs and layers, (L,) per layer)."""
    domains = sorted(popularity)
    layers = next(iter(popularity.values())).shape[0]
    per_layer = np.array([
        np.mean([js_divergence(popularity[a][l], popularity[b][l]) for a, b in itertools.combinations(domains, 2)])
        for l in range(layers)
    ])
    return float(per_layer.mean()), per_layer


# ------------------------------------------------------------------------------------ model passes

def load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def prompt_texts(prompts: Path, tokenizer, per_domain: int | None = None) -> dict[str, list[str]]:
    """{domain: [prompt text as the model sees it]}; chat prompts go through the chat template."""
    out = {d: [] for d in DOMAINS}
    for line in prompts.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if per_domain is not None and len(out[rec["domain"]]) >= per_domain:
            continue
        if "messages" in rec:
            text = tokenizer.apply_chat_template(rec["messages"], tokenize=False, add_generation_prompt=True)
        else:
            text = rec["text"]
        out[rec["domain"]].append(text)
    return out


def prompt_pass(model, tokenizer, texts: list[str], batch_size: int = 16) -> dict:
    """One forward pass over each prompt (prefill), batched with left padding.

    Returns {"nll": summed next-token loss (nats), "targets": (n,) predicted token ids,
             "routes": (L, E) top-k route counts over the prompts' real tokens}.
    """
    import torch

    cfg = model.config
    routes = np.zeros((cfg.num_hidden_layers, cfg.num_experts), dtype=np.int64)
    nll = 0.0
    targets = []
    texts = sorted(texts, key=len)  # similar lengths share a batch: less padding; the sums do not change
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model(**enc, output_router_logits=True)
            mask = enc["attention_mask"].bool()
            # Next-token loss over real tokens: position t predicts t+1 where both are real.
            pair = mask[:, :-1] & mask[:, 1:]
            logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
            gold = enc["input_ids"][:, 1:]
            nll -= logp.gather(-1, gold.unsqueeze(-1)).squeeze(-1)[pair].sum().item()
            targets.append(gold[pair].numpy())
            flat_mask = mask.reshape(-1)
            for layer, logits in enumerate(out.router_logits):
                top = torch.topk(logits.float(), cfg.num_experts_per_tok, dim=-1).indices[flat_mask]
                routes[layer] += np.bincount(top.reshape(-1).numpy(), minlength=cfg.num_experts)
    return {"nll": nll, "targets": np.concatenate(targets), "routes": routes}


def reinit_router(model, seed: int):
    """A copy of `model` whose router (gate) weights are drawn afresh as transformers initialises them."""
    import torch

    clone = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    std = clone.config.initializer_range
    with torch.no_grad():
        for layer in clone.model.layers:
            w = layer.mlp.gate.weight
            w.copy_(torch.randn(w.shape, generator=gen) * std)
    return clone


def stream_pass(model, tokens: np.ndarray, seq_len: int = 256, max_windows: int = 32) -> dict:
    """Consecutive windows of a token stream: {"loss": mean next-token loss, "targets", "routes": (L, E)}."""
    import torch

    cfg = model.config
    x = torch.from_numpy(tokens.astype(np.int64))
    n = min(max_windows, (len(x) - 1) // seq_len)
    inputs = x[: n * seq_len].view(n, seq_len)
    labels = x[1: n * seq_len + 1].view(n, seq_len)
    total = 0.0
    routes = np.zeros((cfg.num_hidden_layers, cfg.num_experts), dtype=np.int64)
    with torch.no_grad():
        for i in range(0, n, 8):
            out = model(input_ids=inputs[i:i + 8], output_router_logits=True)
            logits = out.logits.float()
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[i:i + 8].reshape(-1), reduction="sum").item()
            for layer, rl in enumerate(out.router_logits):
                top = torch.topk(rl.float(), cfg.num_experts_per_tok, dim=-1).indices
                routes[layer] += np.bincount(top.reshape(-1).numpy(), minlength=cfg.num_experts)
    return {"loss": total / (n * seq_len), "targets": labels.reshape(-1).numpy(), "routes": routes}


# -------------------------------------------------------------------------------------------- main

def evaluate(model_dir: Path = DEFAULT_MODEL, prompts: Path = DEFAULT_PROMPTS, per_domain: int | None = None,
             control_seeds: int = 3) -> dict:
    """The held-out evidence on the workload prompts, as plain data (see the module docstring)."""
    import torch

    torch.manual_seed(0)
    model, tokenizer = load(model_dir)
    texts = prompt_texts(prompts, tokenizer, per_domain)
    with np.load(model_dir / "unigram_counts.npz") as npz:
        train_counts = {d: npz[d] for d in DOMAINS}
    loss, popularity, within = {}, {}, []
    for d in DOMAINS:
        # Two halves (even/odd prompts) give both the domain's totals and a sampling-noise floor.
        halves = [prompt_pass(model, tokenizer, texts[d][h::2]) for h in (0, 1)]
        targets = np.concatenate([h["targets"] for h in halves])
        loss[d] = {"model": sum(h["nll"] for h in halves) / len(targets),
                   "unigram_train": unigram_cross_entropy(train_counts[d], targets),
                   "unigram_oracle": unigram_entropy(targets), "tokens": int(len(targets))}
        popularity[d] = halves[0]["routes"] + halves[1]["routes"]
        within.append(mean_pairwise_js({"even": halves[0]["routes"], "odd": halves[1]["routes"]})[0])
    js, js_layers = mean_pairwise_js(popularity)
    controls = []
    for seed in range(control_seeds):
        clone = reinit_router(model, seed)
        control_pop = {d: prompt_pass(clone, tokenizer, texts[d])["routes"] for d in DOMAINS}
        controls.append(mean_pairwise_js(control_pop)[0])
    return {
        "loss": loss, "js_trained": js, "js_trained_per_layer": js_layers.tolist(),
        "js_within_domain": float(np.mean(within)),
        "js_reinit_router": float(np.mean(controls)), "js_reinit_router_seeds": controls,
        "popularity": {d: p.tolist() for d, p in popularity.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--per-domain", type=int, default=None, help="use only the first N prompts of each domain")
    p.add_argument("--control-seeds", type=int, default=3)
    p.add_argument("--corpora-dir", type=Path, default=None, help="also score the training sources' validation split")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    result = evaluate(args.model, args.prompts, args.per_domain, args.control_seeds)

    header = f"  {'domain':8} {'tokens':>7} {'model':>7} {'unigram(train)':>15} {'unigram(oracle)':>16} {'model/unigram(train)':>21}"
    print(f"Held-out workload prompts ({args.prompts}), next-token loss in nats/token:")
    print(header)
    for d, r in result["loss"].items():
        print(f"  {d:8} {r['tokens']:7d} {r['model']:7.3f} {r['unigram_train']:15.3f} {r['unigram_oracle']:16.3f} "
              f"{r['model'] / r['unigram_train']:21.2f}")

    if args.corpora_dir is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train_tiny_moe import collect, encode_stream

        model, tokenizer = load(args.model)
        train_docs, val_docs, _ = collect(args.corpora_dir, args.prompts, 2_000_000, 0)
        print("Validation split of the training sources (last 5%, first 32 windows of 256 tokens), nats/token:")
        print(header)
        val_streams = {d: encode_stream(tokenizer, val_docs[d]) for d in DOMAINS}
        for d in DOMAINS:
            sp = stream_pass(model, val_streams[d])
            targets = sp["targets"]
            counts = np.bincount(encode_stream(tokenizer, train_docs[d]), minlength=len(tokenizer))
            r = {"model": sp["loss"], "unigram_train": unigram_cross_entropy(counts, targets),
                 "unigram_oracle": unigram_entropy(targets), "tokens": int(len(targets))}
            result.setdefault("validation", {})[d] = r
            print(f"  {d:8} {r['tokens']:7d} {r['model']:7.3f} {r['unigram_train']:15.3f} {r['unigram_oracle']:16.3f} "
                  f"{r['model'] / r['unigram_train']:21.2f}")
        js_val = mean_pairwise_js({d: stream_pass(model, val_streams[d])["routes"] for d in DOMAINS})[0]
        clones = [reinit_router(model, seed) for seed in range(args.control_seeds)]
        js_val_control = float(np.mean([
            mean_pairwise_js({d: stream_pass(clone, val_streams[d])["routes"] for d in DOMAINS})[0] for clone in clones]))
        result["validation_js"] = {"trained": js_val, "reinit_router": js_val_control}
        print(f"  expert-popularity JS between domains on this split: trained {js_val:.4f}, "
              f"re-initialised router {js_val_control:.4f}")

    print("Domain specialisation: mean pairwise Jensen-Shannon divergence (base 2) of expert popularity")
    print(f"  trained router:        {result['js_trained']:.4f}  per layer "
          + " ".join(f"{v:.4f}" for v in result["js_trained_per_layer"]))
    print(f"  between two halves of the same domain (sampling-noise floor), trained router: {result['js_within_domain']:.4f}")
    print(f"  re-initialised router: {result['js_reinit_router']:.4f}  (seeds: "
          + " ".join(f"{v:.4f}" for v in result["js_reinit_router_seeds"]) + ")")
    print(f"  ratio: {result['js_trained'] / result['js_reinit_router']:.1f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
