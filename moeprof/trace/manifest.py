"""``manifest.json``: what a trace holds, written last and atomically.

The manifest is the only place a reader learns the model's shape (experts, top-k, which layers are
MoE layers), where the data came from, what the source could not provide, and which shard files
belong to the trace with their row counts and checksums.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprof.errors import TraceError, TraceVersionError
from moeprof.trace.schema import FORMAT_MAJOR, FORMAT_VERSION, MANIFEST_FILE, SOURCES

# What a source can provide. A trace lists what it lacks in ``Manifest.missing`` so that analyses
# report "not available: <reason>" instead of guessing.
CAPABILITIES = ("per_token", "weights", "phase", "request_ids", "batch_id", "token_id", "positions")


@dataclass
class ModelInfo:
    """The routed model's shape, as the trace's readers need it."""

    name: str
    num_experts: int
    top_k: int
    moe_layers: list[int]
    architecture: str | None = None
    num_layers: int | None = None
    num_shared_experts: int = 0
    hidden_size: int | None = None
    dtype: str | None = None
    dense_layers: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelInfo":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Shard:
    """One Parquet file of the trace. ``kind`` is ``routing``, ``loads`` or ``requests``."""

    path: str
    kind: str
    rows: int
    bytes: int
    sha256: str
    request_ids: list[int] | None = None
    """``[first, last]`` request id in a routing shard (readers may skip shards outside a range)."""


@dataclass
class Manifest:
    source: str
    model: ModelInfo
    complete: bool = False
    shards: list[Shard] = field(default_factory=list)
    capture: dict[str, Any] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    """Capability -> why the source could not provide it (see :data:`CAPABILITIES`)."""
    notes: list[str] = field(default_factory=list)
    format_version: str = FORMAT_VERSION
    moeprof_version: str = ""
    created_at: str = ""

    def __post_init__(self) -> None:
        if not self.moeprof_version:
            from moeprof import __version__

            self.moeprof_version = __version__
        if not self.created_at:
            self.created_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def shards_of(self, kind: str) -> list[Shard]:
        return [s for s in self.shards if s.kind == kind]

    def has(self, capability: str) -> bool:
        return capability not in self.missing

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "moeprof_version": self.moeprof_version,
            "created_at": self.created_at,
            "source": self.source,
            "complete": self.complete,
            "model": self.model.to_dict(),
            "capture": self.capture,
            "missing": self.missing,
            "notes": self.notes,
            "shards": [{k: v for k, v in dataclasses.asdict(s).items() if v is not None or k != "request_ids"}
                       for s in self.shards],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST_FILE) -> "Manifest":
        check_version(str(d.get("format_version", "")), where)
        try:
            return cls(
                source=d["source"],
                model=ModelInfo.from_dict(d["model"]),
                complete=bool(d["complete"]),
                shards=[Shard(**s) for s in d.get("shards", [])],
                capture=dict(d.get("capture") or {}),
                missing=dict(d.get("missing") or {}),
                notes=list(d.get("notes") or []),
                format_version=d["format_version"],
                moeprof_version=d.get("moeprof_version", ""),
                created_at=d.get("created_at", ""),
            )
        except (KeyError, TypeError) as exc:
            raise TraceError(f"{where}: malformed manifest ({exc!r}); the trace cannot be read") from None


def check_version(found: str, where: str) -> None:
    """Refuse a format version of another major, naming both versions."""
    try:
        major = int(found.split(".")[0])
    except ValueError:
        raise TraceError(f"{where}: format_version {found!r} is not of the form MAJOR.MINOR") from None
    if major != FORMAT_MAJOR:
        newer = "newer" if major > FORMAT_MAJOR else "older"
        raise TraceVersionError(
            f"{where}: trace format version {found} is {newer} than this moeprof reads "
            f"(format {FORMAT_VERSION}); "
            + ("upgrade moeprof to read it." if major > FORMAT_MAJOR else "re-capture or convert it.")
        )


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(trace_dir: Path) -> Manifest:
    path = Path(trace_dir) / MANIFEST_FILE
    if not Path(trace_dir).exists():
        raise TraceError(f"{trace_dir}: no such trace directory")
    if not path.exists():
        raise TraceError(
            f"{path}: not found; {trace_dir} is not a moeprof trace "
            "(or its capture died before writing anything)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if not isinstance(data, dict):
        raise TraceError(f"{path}: expected a JSON object")
    manifest = Manifest.from_dict(data, where=str(path))
    if manifest.source not in SOURCES:
        raise TraceError(f"{path}: unknown source {manifest.source!r} (known: {', '.join(SOURCES)})")
    return manifest
