"""Workload files: the domain-labelled prompts a capture runs.

A workload is JSON Lines, one request per line::

    {"domain": "code", "text": "def fib(n):"}
    {"domain": "chat", "messages": [{"role": "user", "content": "Hi!"}], "id": "c-1", "dataset": "sharegpt"}

``domain`` (required, non-empty string) and exactly one of ``text`` (string) or ``messages`` (a list
of ``{"role", "content"}`` objects). Optional: ``id`` (string or integer, unique in the file) and
``dataset`` (string). Any other key is an error, so that a misspelt field (``"domian"``) is caught
instead of silently dropped. Blank lines are skipped.

Chat messages are rendered with the tokenizer's chat template (with the generation prompt) when it
has one; otherwise with the plain fallback :func:`plain_chat`: one ``role: content`` line per message
followed by ``assistant:``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from moeprof.errors import WorkloadError

ALLOWED_KEYS = ("domain", "text", "messages", "id", "dataset")


@dataclass(frozen=True)
class Prompt:
    """One request of a workload. ``line`` is its 1-based line number in ``source``."""

    domain: str
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    id: str | int | None = None
    dataset: str | None = None
    source: str = "<memory>"
    line: int = 0

    def render(self, tokenizer: Any = None) -> str:
        """The text fed to the model: ``text``, or ``messages`` through the chat template."""
        if self.text is not None:
            return self.text
        messages = [{"role": r, "content": c} for r, c in self.messages or ()]
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return plain_chat(messages)


def plain_chat(messages: list[dict[str, str]]) -> str:
    """Fallback rendering for tokenizers without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def read_workload(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Read and validate a workload file; raise :class:`WorkloadError` naming ``file:line`` at fault."""
    path = Path(path)
    if not path.exists():
        raise WorkloadError(f"{path}: no such prompts file")
    if path.is_dir():
        raise WorkloadError(f"{path}: is a directory; give the workload JSONL file (one prompt per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read ({exc.strerror})") from None
    prompts = parse_workload(text.splitlines(), source=str(path), limit=limit)
    if not prompts:
        raise WorkloadError(f"{path}: no prompts (the file is empty)")
    return prompts


def parse_workload(lines: Iterable[str], source: str = "<memory>", limit: int | None = None) -> list[Prompt]:
    prompts: list[Prompt] = []
    seen_ids: dict[Any, int] = {}
    for number, raw in enumerate(lines, start=1):
        if limit is not None and len(prompts) >= limit:
            break
        if not raw.strip():
            continue
        where = f"{source}:{number}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        prompt = _parse_one(obj, where, source, number)
        if prompt.id is not None:
            if prompt.id in seen_ids:
                raise WorkloadError(f"{where}: id {prompt.id!r} repeats the id of line {seen_ids[prompt.id]}")
            seen_ids[prompt.id] = number
        prompts.append(prompt)
    return prompts


def _parse_one(obj: Any, where: str, source: str, line: int) -> Prompt:
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(ALLOWED_KEYS))
    if unknown:
        raise WorkloadError(
            f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)}; "
            f"allowed fields: {', '.join(ALLOWED_KEYS)}"
        )
    domain = obj.get("domain")
    if not isinstance(domain, str) or not domain.strip():
        raise WorkloadError(f"{where}: field 'domain' is required and must be a non-empty string")
    has_text, has_messages = "text" in obj, "messages" in obj
    if has_text == has_messages:
        raise WorkloadError(f"{where}: give exactly one of 'text' or 'messages'")
    text = messages = None
    if has_text:
        text = obj["text"]
        if not isinstance(text, str) or not text:
            raise WorkloadError(f"{where}: field 'text' must be a non-empty string")
    else:
        messages = _parse_messages(obj["messages"], where)
    ident = obj.get("id")
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        raise WorkloadError(f"{where}: field 'id' must be a string or an integer")
    dataset = obj.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise WorkloadError(f"{where}: field 'dataset' must be a string")
    return Prompt(domain=domain, text=text, messages=messages, id=ident, dataset=dataset, source=source, line=line)


def _parse_messages(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise WorkloadError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, msg in enumerate(value):
        if (
            not isinstance(msg, dict)
            or set(msg) != {"role", "content"}
            or not isinstance(msg["role"], str)
            or not isinstance(msg["content"], str)
        ):
            raise WorkloadError(
                f"{where}: messages[{i}] must be an object with exactly a string 'role' and a string 'content'"
            )
        out.append((msg["role"], msg["content"]))
    return tuple(out)
