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
* ``vllm-ascend``: the expert map vllm-ascend loads from ``expert_map_path`` (``--additional-config``;
  ``eplb_config.expert_map_path`` in newer releases). Read from vllm-project/vllm-ascend
  ``vllm_ascend/ops/expert_load_balancer.py`` (``ExpertLoadBalancer._expert_file_to_tensor``):
  ``{"moe_layer_count": L, "layer_list": [{"layer_id", "device_count", "device_list":
  [{"device_id", "device_expert": [logical expert of each local slot]}]}]}``. ``layer_list`` is indexed
  by the MoE layer's ordinal (``moe_instance_id``), devices are EP ranks in order, every device holds
  the same number of slots (it becomes one tensor), and a device's ids become its local indices
  (``expert_placement_map[layer, rank, ids] = arange``), so one expert twice on a device is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from moeprof.errors import OutputExistsError, PlacementError
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


def vllm_ascend_expert_map(p: Placement) -> dict:
    S, G = p.topology.slots_per_gpu, p.topology.num_gpus
    layers = []
    for i, layer in enumerate(p.moe_layers):
        devices = []
        for g in range(G):
            ids = [int(x) for x in p.phy2log[i, g * S : (g + 1) * S]]
            if len(set(ids)) != len(ids):
                dup = next(x for x in ids if ids.count(x) > 1)
                raise PlacementError(
                    f"vllm-ascend export: layer {layer} puts expert {dup} twice on device {g}; vllm-ascend's "
                    "expert map keeps one copy per device (choose another policy or fewer --redundant)"
                )
            devices.append({"device_id": g, "device_expert": ids})
        layers.append({"layer_id": i, "device_count": G, "device_list": devices})
    return {"moe_layer_count": len(p.moe_layers), "layer_list": layers}


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
    "vllm-ascend": Exporter(vllm_ascend_expert_map, lambda d: json.dumps(d, indent=1) + "\n", ".vllm-ascend.json"),
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
