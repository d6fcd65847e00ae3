"""Write a placement in the formats serving engines load.

* ``sglang``: the JSON that ``--init-expert-location`` accepts (``sglang/srt/eplb/expert_location.py``
  passes its keys to ``ExpertLocationMetadata.init_by_mapping``, so the file holds exactly
  ``physical_to_logical_map``, one row per transformer layer, dense layers included: those keep the
  trivial ``p mod E`` map). Start SGLang with ``--ep-num-redundant-experts`` = P - E.
* ``trtllm``: TensorRT-LLM's MoE load balancer YAML (``MoeLoadBalancerConfig``: ``num_slots``,
  ``initial_global_assignments`` {model layer index: the expert of each slot, GPU-major},
  ``layer_updates_per_iter: 0`` for a static placement), as ``examples/ep_load_balancer`` writes it.
* ``deepseek``: EPLB's three outputs as JSON, ``phy2log`` ``[L][P]``, ``log2phy`` ``[L][E][X]``,
  ``logcnt`` ``[L][E]``, rows in MoE-layer order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from moeprof.errors import OutputExistsError
from moeprof.placement.plan import Placement


def sglang_init_expert_location(p: Placement) -> dict:
    num_layers = p.model.get("num_layers") or (max(p.moe_layers) + 1)
    P, E = p.topology.num_slots, p.topology.num_experts
    rows = [list(map(int, np.arange(P) % E)) for _ in range(num_layers)]
    for i, layer in enumerate(p.moe_layers):
        rows[layer] = list(map(int, p.phy2log[i]))
    return {"physical_to_logical_map": rows}


def trtllm_load_balancer(p: Placement) -> dict:
    return {
        "num_slots": int(p.topology.num_slots),
        "initial_global_assignments": {int(layer): list(map(int, p.phy2log[i])) for i, layer in enumerate(p.moe_layers)},
        "layer_updates_per_iter": 0,
    }


def deepseek_eplb(p: Placement) -> dict:
    return {"phy2log": p.phy2log.tolist(), "log2phy": p.log2phy.tolist(), "logcnt": p.logcnt.tolist()}


def _json(d: dict) -> str:
    return json.dumps(d, separators=(",", ":")) + "\n"


def _yaml(d: dict) -> str:
    """The YAML of :func:`trtllm_load_balancer` (ints and flat int lists only), lists in flow style."""
    lines = ["initial_global_assignments:"]
    for layer, slots in d["initial_global_assignments"].items():
        lines.append(f"  {layer}: [{', '.join(map(str, slots))}]")
    lines.append(f"layer_updates_per_iter: {d['layer_updates_per_iter']}")
    lines.append(f"num_slots: {d['num_slots']}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Exporter:
    build: Callable[[Placement], dict]
    render: Callable[[dict], str]
    suffix: str


EXPORTERS: dict[str, Exporter] = {
    "sglang": Exporter(sglang_init_expert_location, _json, ".sglang.json"),
    "trtllm": Exporter(trtllm_load_balancer, _yaml, ".trtllm.yaml"),
    "deepseek": Exporter(deepseek_eplb, _json, ".deepseek.json"),
}


def write_export(p: Placement, fmt: str, path: str | Path, *, force: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force to replace it")
    exp = EXPORTERS[fmt]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(exp.render(exp.build(p)))
    tmp.replace(path)
    return path
