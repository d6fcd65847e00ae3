"""``placement.json``: a placement as engines name it, the grouping model and the simulated figures.

Format version 1. Per MoE layer (rows in ``moe_layers`` order) the three maps DeepSeek EPLB, vLLM and
SGLang use: ``physical_to_logical_map[L][P]``, ``logical_to_physical_map[L][E][X]`` (-1 padded) and
``logical_replica_count[L][E]``. The file is checked against ``schemas/placement.schema.json`` when
written and when read.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from moeprof.errors import OutputExistsError, PlacementError
from moeprof.placement.eplb import logical_to_physical
from moeprof.placement.grouping import GroupingModel
from moeprof.placement.topology import Topology

PLACEMENT_FORMAT_VERSION = "1.0"


def placement_schema() -> dict[str, Any]:
    return json.loads(resources.files("moeprof.schemas").joinpath("placement.schema.json").read_text())


@dataclass
class Placement:
    topology: Topology
    policy: str
    moe_layers: list[int]
    phy2log: np.ndarray  # [L, P]
    grouping: GroupingModel
    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None

    @property
    def logcnt(self) -> np.ndarray:
        """``[L, E]`` copies of every logical expert."""
        E = self.topology.num_experts
        return np.stack([np.bincount(row, minlength=E) for row in self.phy2log])

    @property
    def log2phy(self) -> np.ndarray:
        return logical_to_physical(self.phy2log, self.topology.num_experts)

    def check(self) -> None:
        """Raise :class:`PlacementError` unless every slot holds a valid expert and every expert has a slot."""
        t = self.topology
        L = len(self.moe_layers)
        if self.phy2log.shape != (L, t.num_slots):
            raise PlacementError(
                f"placement has shape {self.phy2log.shape}, expected ({L} layers, {t.num_slots} slots)"
            )
        if self.phy2log.min() < 0 or self.phy2log.max() >= t.num_experts:
            raise PlacementError(f"placement names experts outside 0..{t.num_experts - 1}")
        missing = np.argwhere(self.logcnt == 0)
        if len(missing):
            layer, expert = missing[0]
            raise PlacementError(
                f"layer {self.moe_layers[layer]}: expert {expert} has no slot ({len(missing)} unplaced in all)"
            )
        self.grouping.check(t.nodes, L * t.num_experts)

    def to_dict(self) -> dict[str, Any]:
        from moeprof import __version__

        return dict(
            format_version=PLACEMENT_FORMAT_VERSION,
            moeprof_version=__version__,
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            model=self.model,
            topology=self.topology.to_dict(),
            policy=dict(name=self.policy, params=self.params, info=self.info),
            fit=self.fit,
            moe_layers=list(map(int, self.moe_layers)),
            physical_to_logical_map=self.phy2log.tolist(),
            logical_to_physical_map=self.log2phy.tolist(),
            logical_replica_count=self.logcnt.tolist(),
            grouping=self.grouping.to_dict(),
            metrics=self.metrics,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Placement":
        slots = {len(row) for row in d["physical_to_logical_map"]}
        if len(slots) > 1:
            raise PlacementError(f"physical_to_logical_map: rows of {sorted(slots)} slots; every layer needs the same")
        p = cls(
            topology=Topology.from_dict(d["topology"]),
            policy=d["policy"]["name"],
            moe_layers=list(d["moe_layers"]),
            phy2log=np.asarray(d["physical_to_logical_map"], dtype=np.int64),
            grouping=GroupingModel.from_dict(d["grouping"]),
            params=d["policy"].get("params", {}),
            info=d["policy"].get("info", {}),
            model=d.get("model", {}),
            fit=d.get("fit", {}),
            metrics=d.get("metrics"),
        )
        p.check()
        # The two derived maps are what an engine may load; a hand edit of one map only is a mistake.
        for key, derived in (("logical_replica_count", p.logcnt), ("logical_to_physical_map", p.log2phy)):
            if d[key] != derived.tolist():
                raise PlacementError(
                    f"{key} does not match physical_to_logical_map (the map moeprof reads); make them agree, "
                    "or write the file again with `moeprof place`"
                )
        return p


def validate_placement_dict(d: dict[str, Any], where: str) -> None:
    try:
        jsonschema.validate(d, placement_schema())
    except jsonschema.ValidationError as exc:
        path = "/".join(map(str, exc.absolute_path)) or "(top level)"
        raise PlacementError(f"{where}: not a valid placement file at {path}: {exc.message}") from None


def write_placement(placement: Placement, out: str | Path, *, force: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    placement.check()
    d = _jsonable(placement.to_dict())
    validate_placement_dict(d, str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(d, separators=(",", ":")) + "\n")
    tmp.replace(out)
    return out


def read_placement(path: str | Path) -> Placement:
    path = Path(path)
    if not path.is_file():
        raise PlacementError(f"{path}: no such placement file; write one with `moeprof place`")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlacementError(f"{path}: not JSON ({exc})") from None
    if not isinstance(d, dict):
        raise PlacementError(f"{path}: not a placement file (expected a JSON object)")
    found = str(d.get("format_version", "?"))
    if found.split(".")[0] != PLACEMENT_FORMAT_VERSION.split(".")[0]:
        raise PlacementError(
            f"{path}: placement format {found}, this moeprof reads {PLACEMENT_FORMAT_VERSION}; "
            "rewrite it with this version's `moeprof place`"
        )
    validate_placement_dict(d, str(path))
    try:
        return Placement.from_dict(d)
    except PlacementError as exc:
        raise PlacementError(f"{path}: {exc}") from None


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
