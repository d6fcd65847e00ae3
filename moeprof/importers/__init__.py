"""Import routing dumps of serving engines into a moeprof trace.

One module per source; each streams its input into a :class:`~moeprof.trace.writer.TraceWriter`
through :func:`import_trace`. :func:`detect` names the format from the file's own structure
(magic bytes, JSON keys, CSV header), never from its name alone. Importing this package does not
import torch: only the SGLang importer needs it, and only when it reads a file.

    >>> from moeprof.importers import import_trace, ImportOptions
    >>> import_trace("auto", ["expert_distribution_recorder_1.pt"], "trace/")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from pathlib import Path

from moeprof.importers.base import ImportOptions, Importer
from moeprof.errors import ImportFormatError

# Name -> "module:Class", in the order detect() tries them (most specific first).
_REGISTRY = {
    "sglang": "moeprof.importers.sglang:SGLangImporter",
    "vllm": "moeprof.importers.vllm:VLLMImporter",
    "megatron": "moeprof.importers.megatron:MegatronRouterTraceImporter",
    "megatron-tpe": "moeprof.importers.megatron:MegatronTokensPerExpertImporter",
    "trtllm": "moeprof.importers.trtllm:TrtllmExpertStatisticImporter",
    "jsonl": "moeprof.importers.jsonl:JsonlImporter",
    "counts": "moeprof.importers.counts:CountsImporter",
    "expert-selection": "moeprof.importers.expert_selection:ExpertSelectionImporter",
}

FORMATS = tuple(_REGISTRY)
HEAD_BYTES = 1 << 16


def importer_class(name: str) -> type[Importer]:
    """The importer class of format ``name`` (one of :data:`FORMATS`), its module imported alone."""
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def registry() -> dict[str, type[Importer]]:
    """Format name -> importer class (the modules import no optional dependency at import time)."""
    return {name: importer_class(name) for name in _REGISTRY}


COMPRESSORS = {"gzip": "gunzip -k", "zstd": "zstd -d", "bzip2": "bunzip2 -k", "xz": "unxz -k"}
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


def compression(head: bytes) -> str | None:
    """The compressor whose magic number ``head`` starts with, or None."""
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


def detect(path: str | Path) -> str:
    """The format of ``path`` from its first bytes; :class:`ImportFormatError` if none matches."""
    path = Path(path)
    if path.is_dir():
        for name, cls in registry().items():
            if getattr(cls, "accepts_directories", False) and cls.sniff(path, b""):
                return name
        raise ImportFormatError(
            f"{path}: is a directory and no format that reads directories "
            f"({', '.join(n for n, c in registry().items() if getattr(c, 'accepts_directories', False))}) "
            "recognises it; name the dump files inside it"
        )
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError as exc:
        raise ImportFormatError(f"{path}: cannot read ({exc.strerror})") from None
    if not head:
        raise ImportFormatError(f"{path}: the file is empty")
    for name, cls in registry().items():
        if cls.sniff(path, head):
            return name
    compressed = compression(head)
    if compressed:
        raise ImportFormatError(f"{path}: {compressed}-compressed, and not a .tar.gz of expert-selection traces (or one "
                                f"cut off); decompress it first ({COMPRESSORS[compressed]} {path}) and import the result")
    raise ImportFormatError(
        f"{path}: cannot tell its format from its content; name it: moeprof import FORMAT "
        f"(one of {', '.join(FORMATS)})"
    )


def import_trace(*args, **kwargs):
    """See :func:`moeprof.importers.run.import_trace`."""
    from moeprof.importers.run import import_trace as _run

    return _run(*args, **kwargs)


def export_jsonl(trace, path):
    """See :func:`moeprof.importers.jsonl.export_jsonl`."""
    from moeprof.importers.jsonl import export_jsonl as _export

    return _export(trace, path)


__all__ = ["FORMATS", "ImportOptions", "Importer", "detect", "export_jsonl", "import_trace", "registry"]
