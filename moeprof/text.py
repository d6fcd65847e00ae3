"""Small text helpers shared by library messages and renderers."""

from __future__ import annotations

from typing import Iterable


def format_ranges(xs: Iterable[int], empty: str = "none") -> str:
    """``[0, 1, 2, 5, 6]`` -> ``"0-2, 5-6"`` (layer lists in messages and tables)."""
    xs = sorted(xs)
    if not xs:
        return empty
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:]:
        if x != prev + 1:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = x
        prev = x
    out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ", ".join(out)
