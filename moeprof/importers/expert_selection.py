"""The public expert-selection traces: one JSON file per request, a list of forward steps.

The format of ``core12345/MoE_expert_selection_trace`` ("Patterns behind Chaos" / "Orders in Chaos",
arXiv 2510.05497: DeepSeek-R1, Qwen3-235B, Llama-4-Maverick, Kimi-K2 on MMLU, HellaSwag,
LiveCodeBench, ...), laid out ``profiling_result/{org}/{model}/{benchmark}/{subject}/{N}.json``.
Each file is one request::

    [ {"0": null, "1": [[45], [102], ...], "2": null, ...},   # step 0: prefill, one list per token
      {"0": null, "1": [[66]], ...},                          # step 1: the first decode token
      ... ]

Keys are transformer layer ids; ``null`` marks a dense layer; each token's list holds its top-k
expert ids. The source is a directory (searched recursively for ``*.json``) or a ``.tar``/``.tar.gz``
of one; a tarball is read member by member (memory: one request at a time).

Mapping to the trace: request key = the file's path relative to the source without ``.json``
(``llama4-mmlu-anatomy/12``: what ``--domains`` must name); step = the list index (0 = prefill,
i = i-th decode step); pos = token index in the prefill, then prefill length + i - 1; domain = the
file's directory name. When several directories share a prefix that ends in ``-``
(``llama4-mmlu-anatomy``, ``llama4-mmlu-astronomy``), the prefix is a model/benchmark tag and is
stripped (``anatomy``); only ``-`` counts as the separator, as subject names use ``_``
(``high_school_biology``). The model name comes from a ``profiling_result/{org}/{model}`` path when
the source has one. The traces carry no weights, token ids or batch ids, and no expert count
(``--num-experts``; otherwise the largest id + 1).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from itertools import chain
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy as np

from moeprof.importers.base import DECODE, PREFILL, Importer, RoutingChunk, bad
from moeprof.importers.warmup import WarmupDetector

try:  # orjson parses ~3x faster when present; the stdlib is the fallback
    from orjson import loads as _json_loads
except ImportError:  # pragma: no cover - depends on the environment
    _json_loads = json.loads

# The first step is an object keyed by layer id whose values are null or lists of token lists.
_START = re.compile(rb'^\s*\[\s*\{\s*"\d+"\s*:\s*(null|\[\s*\[)')
_GZIP, _TAR_MAGIC = b"\x1f\x8b", b"ustar"


def _is_tar(path: Path, head: bytes) -> bool:
    return head[:2] == _GZIP or head[257:262] == _TAR_MAGIC


def _json_files(root: Path) -> Iterator[Path]:
    """``*.json`` under ``root`` in a stable order (directories and files sorted). Directories moeprof
    wrote (a trace imported into the source directory, an analysis) are not requests: left out."""
    from moeprof.outputs import MARKER

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not (Path(dirpath) / d / MARKER).exists())
        for name in sorted(filenames):
            if name.endswith(".json"):
                yield Path(dirpath) / name


def common_tag(dirs: list[str]) -> str:
    """The ``-``-terminated prefix every name in ``dirs`` shares (``""`` unless there are two or more)."""
    names = sorted(set(dirs))
    if len(names) < 2:
        return ""
    prefix = os.path.commonprefix(names)
    cut = prefix.rfind("-")
    tag = prefix[: cut + 1] if cut >= 0 else ""
    return tag if all(len(n) > len(tag) for n in names) else ""


class ExpertSelectionImporter(Importer):
    name = "expert-selection"
    source = "expert-selection"
    description = ("public expert-selection traces (core12345/MoE_expert_selection_trace): a directory or "
                   ".tar.gz of per-request JSON step lists")
    accepts_directories = True

    def __init__(self, options) -> None:
        super().__init__(options)
        self._dirs: dict[str, str] = {}  # request key -> its directory name
        self._warmup = WarmupDetector()
        self._k: int | None = None
        self._k_where = ""

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        try:
            if path.is_dir():
                first = next(_json_files(path), None)
                return first is not None and bool(_START.match(first.open("rb").read(4096)))
            if not _is_tar(path, head):
                return bool(_START.match(head))
            with tarfile.open(path, "r|*") as tf:
                for i, member in enumerate(tf):
                    if member.isfile() and member.name.endswith(".json"):
                        fh = tf.extractfile(member)
                        return fh is not None and bool(_START.match(fh.read(4096)))
                    if i > 16:
                        return False
        except (OSError, tarfile.TarError, EOFError):
            return False
        return False

    # -- reading ---------------------------------------------------------------------------------
    def read(self, path: Path, progress: Callable[[int], None]) -> Iterator[RoutingChunk]:
        for rel, raw in self._files(path, progress):
            where = f"{path}: {rel}" if path.is_dir() or rel != path.name else str(path)
            key = str(PurePosixPath(rel).with_suffix(""))
            parts = PurePosixPath(key).parts
            self._dirs[key] = parts[-2] if len(parts) > 1 else ""
            self._model_from(parts)
            chunk = self._request(raw, key, where, path)
            if chunk is not None:
                yield chunk
        tag = common_tag(list(self._dirs.values()))
        self.domains = {k: d[len(tag):] for k, d in self._dirs.items() if d}
        if tag:
            self.note(f"domains: the directory prefix {tag!r} that every directory shares was stripped")
        for cap, why in (("weights", "the trace logs expert ids only"),
                         ("token_id", "the trace logs no token ids"),
                         ("batch_id", "the trace logs each request alone, not the batch that carried it")):
            self.missing[cap] = why

    def _files(self, path: Path, progress) -> Iterator[tuple[str, bytes]]:
        if path.is_dir():
            for f in _json_files(path):
                raw = f.read_bytes()
                progress(len(raw))
                yield f.relative_to(path).as_posix(), raw
            return
        with open(path, "rb") as head_fh:
            head = head_fh.read(512)
        if not _is_tar(path, head):
            raw = path.read_bytes()
            progress(len(raw))
            yield path.name, raw
            return
        with open(path, "rb") as fh:
            done = 0
            try:
                with tarfile.open(fileobj=fh, mode="r|*") as tf:
                    for member in tf:
                        if member.isfile() and member.name.endswith(".json"):
                            data = tf.extractfile(member)
                            raw = data.read() if data is not None else b""
                            yield member.name.removeprefix("./"), raw
                        progress(fh.tell() - done)
                        done = fh.tell()
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise bad(path, "archive", f"cannot read the tarball ({exc}); is it cut off?") from None

    def _model_from(self, parts: tuple[str, ...]) -> None:
        if self.model_name is None and "profiling_result" in parts:
            i = parts.index("profiling_result")
            if len(parts) > i + 2:
                self.model_name = f"{parts[i + 1]}/{parts[i + 2]}"

    def _request(self, raw: bytes, key: str, where: str, path: Path) -> RoutingChunk | None:
        try:
            steps = _json_loads(raw)
        except ValueError:
            raise bad(where, "JSON", "not valid JSON (cut off, or not an expert-selection trace)") from None
        if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
            raise bad(where, "top level", "expected a JSON list of forward steps, each an object layer -> tokens")
        # One entry per (step, layer) run of tokens; the rows' columns are built from them in numpy (a
        # list extended per token-column per layer cost 3.8 s of a 6.4 s import of 1.3 M rows).
        # per run: tokens, layer, n; per step: step, pos0, count (its runs)
        runs: dict[str, list] = {"tokens": [], "layer": [], "n": [], "step": [], "pos0": [], "count": []}
        pos0 = 0
        for i, step in enumerate(steps):
            n_tok = self._step(step, i, pos0, runs, where)
            pos0 += n_tok
        if self.num_layers is None:
            self.num_layers = len(steps[0])
        if not runs["tokens"]:
            self.note(f"{where}: no MoE layer has routing; the request is left out")
            return None
        n = np.asarray(runs["n"], dtype=np.int64)
        count = np.asarray(runs["count"], dtype=np.int64)
        first = np.cumsum(n) - n  # each run's first row
        step = np.repeat(np.repeat(np.asarray(runs["step"], dtype=np.int32), count), n)
        layer = np.repeat(np.asarray(runs["layer"], dtype=np.int64), n)
        pos0 = np.repeat(np.asarray(runs["pos0"], dtype=np.int64), count)
        pos = (np.repeat(pos0 - first, n) + np.arange(int(n.sum()))).astype(np.int32)
        cols = {"step": step, "layer": layer, "pos": pos, "experts": list(chain.from_iterable(runs["tokens"]))}
        experts = self._experts(cols, where)
        return RoutingChunk(
            request_key=[key] * len(step),
            step=step,
            phase=np.where(step == 0, PREFILL, DECODE).astype(np.int8),
            pos=pos,
            layer=layer,
            experts=experts,
            where=where,
            warmup=self._warmup.judge(layer, experts),
        )

    def _experts(self, cols: dict[str, list], where: str) -> np.ndarray:
        """``(n, k)`` int64 from the per-token lists; an error names the first token that breaks the shape."""
        ids = cols["experts"]
        try:
            experts = np.asarray(ids)
        except ValueError:
            experts = None
        if experts is None or experts.ndim != 2 or experts.shape[1] == 0 or experts.dtype.kind not in "iu":
            k = self._k or (len(ids[0]) if isinstance(ids[0], list) else 0)
            j = next((j for j, t in enumerate(ids) if not isinstance(t, list) or len(t) != k or not t
                      or not all(isinstance(e, int) for e in t)), 0)
            raise bad(where, f"step {cols['step'][j]}, layer {cols['layer'][j]}, token {cols['pos'][j]}",
                      f"expected a non-empty list of {k or 'k'} integer expert ids, found {ids[j]!r}")
        if self._k is None:
            self._k, self._k_where = int(experts.shape[1]), where
        elif experts.shape[1] != self._k:
            raise bad(where, "routing", f"inconsistent top-k: {experts.shape[1]} expert ids per token here, "
                      f"{self._k} in {self._k_where}")
        return experts.astype(np.int64, copy=False)

    def _step(self, step: dict[str, Any], i: int, pos0: int, runs: dict[str, list], where: str) -> int:
        """Add the step's runs of tokens (one per layer with tokens) to ``runs``; its number of tokens."""
        before = len(runs["tokens"])
        n_tok = self._step_whole(step, runs)
        if n_tok is None:  # some layer is null or not as expected: layer by layer, naming what is wrong
            n_tok = self._step_layers(step, i, runs, where)
        runs["step"].append(i)
        runs["pos0"].append(pos0)
        runs["count"].append(len(runs["tokens"]) - before)
        return n_tok

    @staticmethod
    def _step_whole(step: dict[str, Any], runs: dict[str, list]) -> int | None:
        """A step whose every layer holds a list of as many tokens, added with a few bulk calls (most
        steps are one decode token in every layer: per-layer Python was most of an import); else None."""
        tokens = list(step.values())
        if not tokens or None in tokens or not all(type(t) is list for t in tokens):
            return None
        try:
            layers = list(map(int, step))
        except ValueError:
            return None
        n = list(map(len, tokens))
        if n.count(n[0]) != len(n):
            return None
        if n[0]:
            runs["tokens"] += tokens
            runs["layer"] += layers
            runs["n"] += n
        return n[0]

    @staticmethod
    def _step_layers(step: dict[str, Any], i: int, runs: dict[str, list], where: str) -> int:
        n_tok: int | None = None
        for lay_s, tokens in step.items():
            if tokens is None:
                continue
            try:
                lay = int(lay_s)
            except ValueError:
                raise bad(where, f"step {i}", f"layer key {lay_s!r} is not an integer layer id") from None
            if not isinstance(tokens, list):
                raise bad(where, f"step {i}, layer {lay}", "expected null or a list of per-token expert-id lists")
            n = len(tokens)
            if n_tok is None:
                n_tok = n
            elif n != n_tok:
                raise bad(where, f"step {i}, layer {lay}",
                          f"{n} tokens here but {n_tok} in an earlier layer of the same step")
            # whole lists at a time; shapes and types are checked once per request, in numpy
            if n:
                runs["tokens"].append(tokens)
                runs["layer"].append(lay)
                runs["n"].append(n)
        return n_tok or 0
