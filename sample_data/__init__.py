"""The embedded default: the tiny trained MoE (``tiny-moe/``), the sample workload (``prompts.jsonl``),
a trace captured from them (``trace/``) and the thresholds ``moeprof demo`` checks (``rules.toml``).
See ``README.md`` here for sources and licenses."""

from __future__ import annotations

from pathlib import Path


def path(name: str) -> Path | None:
    """The shipped file or directory ``name``, or ``None`` when this installation lacks it."""
    candidate = Path(__file__).resolve().parent / name
    return candidate if candidate.exists() else None
