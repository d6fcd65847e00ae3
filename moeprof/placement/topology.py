"""The cluster a placement targets: N nodes × G GPUs, S expert slots per GPU in every MoE layer.

Physical slots are numbered GPU-major, the way DeepSeek EPLB, vLLM and SGLang number physical
experts: slot ``p`` lives on GPU ``p // S``, and GPU ``g`` on node ``g // G``. ``N·G·S`` must be at
least the number of logical experts ``E``; the ``N·G·S - E`` extra slots hold redundant copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moeprof.errors import PlacementError, UsageError

# Slots per layer the simulator holds at most: it keeps arrays over every slot (and slot pairs), so far
# beyond this a typo such as `-n 99999999999` would end in a numpy allocation error, not a message.
MAX_SLOTS = 1 << 16


@dataclass(frozen=True)
class Topology:
    nodes: int
    gpus_per_node: int
    slots_per_gpu: int
    num_experts: int

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def num_slots(self) -> int:
        """Physical experts per layer (``num_physical_experts`` in the engines)."""
        return self.num_gpus * self.slots_per_gpu

    @property
    def num_redundant(self) -> int:
        return self.num_slots - self.num_experts

    @property
    def slots_per_node(self) -> int:
        return self.gpus_per_node * self.slots_per_gpu

    def gpu_of_slot(self) -> np.ndarray:
        """``[num_slots]`` GPU index of every physical slot."""
        return np.arange(self.num_slots) // self.slots_per_gpu

    def node_of_slot(self) -> np.ndarray:
        """``[num_slots]`` node index of every physical slot."""
        return self.gpu_of_slot() // self.gpus_per_node

    def describe(self) -> str:
        return (
            f"{self.nodes} nodes × {self.gpus_per_node} GPUs × {self.slots_per_gpu} slots = "
            f"{self.num_slots} expert slots per layer for {self.num_experts} experts"
            + (f" ({self.num_redundant} redundant)" if self.num_redundant else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(
            nodes=self.nodes,
            gpus_per_node=self.gpus_per_node,
            slots_per_gpu=self.slots_per_gpu,
            num_gpus=self.num_gpus,
            num_physical_experts=self.num_slots,
            num_logical_experts=self.num_experts,
            num_redundant_experts=self.num_redundant,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Topology":
        return cls(int(d["nodes"]), int(d["gpus_per_node"]), int(d["slots_per_gpu"]), int(d["num_logical_experts"]))


def build_topology(
    num_experts: int,
    nodes: int,
    gpus_per_node: int,
    *,
    slots_per_gpu: int | None = None,
    redundant: int | None = None,
) -> Topology:
    """Check the options and return a :class:`Topology`.

    Give at most one of ``slots_per_gpu`` and ``redundant`` (extra physical experts per layer, as
    SGLang's ``--ep-num-redundant-experts``); with neither, each GPU gets ``ceil(E / (N·G))`` slots.
    """
    if nodes < 1:
        raise UsageError(f"--nodes must be at least 1, got {nodes}")
    if gpus_per_node < 1:
        raise UsageError(f"--gpus-per-node must be at least 1, got {gpus_per_node}")
    gpus = nodes * gpus_per_node
    if slots_per_gpu is not None and redundant is not None:
        raise UsageError("give either --slots-per-gpu or --redundant, not both")
    if redundant is not None:
        if redundant < 0:
            raise UsageError(f"--redundant must be 0 or more, got {redundant}")
        total = num_experts + redundant
        _check_size(max(total, gpus), f"{nodes} nodes × {gpus_per_node} GPUs, {num_experts} experts + {redundant} redundant")
        if total % gpus:
            up = -(-total // gpus) * gpus - num_experts
            raise PlacementError(
                f"--redundant {redundant}: {num_experts} experts + {redundant} redundant = {total} slots "
                f"do not divide evenly over {gpus} GPUs; use --redundant {up}"
            )
        slots_per_gpu = total // gpus
    elif slots_per_gpu is None:
        slots_per_gpu = -(-num_experts // gpus)
    if slots_per_gpu < 1:
        raise UsageError(f"--slots-per-gpu must be at least 1, got {slots_per_gpu}")
    _check_size(gpus * slots_per_gpu, f"{nodes} nodes × {gpus_per_node} GPUs × {slots_per_gpu} slots")
    if gpus * slots_per_gpu < num_experts:
        need = -(-num_experts // gpus)
        raise PlacementError(
            f"{nodes} nodes × {gpus_per_node} GPUs × {slots_per_gpu} slots = {gpus * slots_per_gpu} expert slots "
            f"per layer, fewer than the model's {num_experts} experts; use --slots-per-gpu {need} or more GPUs"
        )
    return Topology(nodes, gpus_per_node, slots_per_gpu, num_experts)


def _check_size(slots: int, what: str) -> None:
    if slots > MAX_SLOTS:
        raise UsageError(
            f"{what} = {slots:,} expert slots per layer; moeprof simulates at most {MAX_SLOTS:,}: "
            "check --nodes, --gpus-per-node, --slots-per-gpu and --redundant"
        )
