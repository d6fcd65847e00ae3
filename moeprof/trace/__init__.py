"""Trace format v1: schema, writer, reader. Depends on nothing else in moeprof.

Names are loaded lazily so that writing a trace (capture, import) needs only pyarrow, while reading
one (``Trace``) brings in polars.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "FORMAT_VERSION": "moeprof.trace.schema",
    "routing_schema": "moeprof.trace.schema",
    "Manifest": "moeprof.trace.manifest",
    "ModelInfo": "moeprof.trace.manifest",
    "Shard": "moeprof.trace.manifest",
    "TraceWriter": "moeprof.trace.writer",
    "routing_table": "moeprof.trace.writer",
    "Trace": "moeprof.trace.reader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moeprof.trace' has no attribute {name!r}")
