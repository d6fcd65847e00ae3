"""Request tags: a workload's domain carried inside the request id a server hands to its engine.

``moeprof replay`` sends each request with the header ``X-Request-Id: <tag>``; vLLM builds its
internal request id around it (``cmpl-<tag>-0-1a2b3c4d``), and the vLLM plugin, which sees only
engine request ids, reads the domain back with :func:`parse_tag`. A tag is
``moeprof~<index>~<domain>~<dataset>~`` with domain and dataset percent-encoded, so any text
survives and the tag never contains ``~`` inside a field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

_TAG = re.compile(r"moeprof~(\d+)~([^~]*)~([^~]*)~")


@dataclass(frozen=True)
class RequestTag:
    index: int
    """0-based order of the request in its workload file."""
    domain: str
    dataset: str | None


def _enc(text: str) -> str:
    return quote(text, safe="").replace("~", "%7E")


def make_tag(index: int, domain: str, dataset: str | None = None) -> str:
    return f"moeprof~{int(index)}~{_enc(domain)}~{_enc(dataset or '')}~"


def parse_tag(request_id: str) -> RequestTag | None:
    """The tag inside an engine request id, or ``None`` if the request did not come from replay."""
    m = _TAG.search(request_id)
    if m is None:
        return None
    return RequestTag(int(m.group(1)), unquote(m.group(2)), unquote(m.group(3)) or None)
