"""Find where a transformers v5 MoE model routes tokens, and hook there.

Glossary (see also :mod:`moeprof.glossary`):

routing point
    The one place per MoE layer where the chosen expert ids can be read. Two kinds:

    ``experts_input``
        v5 MoE blocks hand the choice to their expert bank as ``self.experts(hidden_states,
        top_k_index, top_k_weights)``. A forward pre-hook on that module reads the ids the experts
        actually receive: after bias correction (DeepSeek-V3, Ernie 4.5), group limits (DeepSeek-V3),
        sparsemixer (PhiMoE) or any other selection rule. This covers almost every v5 MoE model.
    ``router_output``
        Where the experts module receives no ids (Llama 4 feeds the experts pre-scaled dense inputs;
        JetMoE's parallel experts take per-expert sizes), a forward hook on the router reads its
        output instead. :data:`ROUTER_EXTRACTORS` says, per router class, how its output gives the
        ids; that table is the only per-model knowledge here.

Discovery is structural: a module named ``experts`` whose ``forward`` takes at least two arguments
after the hidden states is a routing point; the transformer layer index is the first integer in the
module path (``model.layers.3.mlp.experts`` is layer 3). Layers of the same ``ModuleList`` without
a routing point are dense layers. Nothing in this module synchronises with the device.
"""

from __future__ import annotations

import os

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from moeprof.errors import CaptureError
from moeprof.trace.manifest import ModelInfo

Extractor = Callable[[Any, int], "tuple[torch.Tensor, torch.Tensor | None]"]
"""``(router output, top_k) -> (ids (n, k) integer, weights (n, k) float or None)``, on the device."""


def _llama4_router(output: Any, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Llama4Router returns (scores (n, E) dense: sigmoid of the top-k logits, 0 elsewhere; logits (n, E)).
    # Its experts get dense pre-scaled inputs, never ids. The router's own choice is
    # torch.topk(logits, top_k, dim=1): the same call on the same tensor gives the same ids, in order.
    scores, logits = output[0], output[1]
    ids = torch.topk(logits, top_k, dim=1).indices
    return ids, scores.gather(1, ids)


def _jetmoe_gating(output: Any, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # JetMoeTopKGating returns (index_sorted_experts, batch_index, batch_gates, expert_size, logits):
    # token/expert pairs sorted by expert for its parallel experts, no (n, k) id tensor. Its choice is
    # logits.topk(top_k, dim=1) and its gates are the softmax over those top-k logits.
    logits = output[-1]
    top = logits.topk(top_k, dim=1)
    return top.indices, torch.softmax(top.values, dim=1)


ROUTER_EXTRACTORS: dict[str, Extractor] = {
    "Llama4Router": _llama4_router,
    "JetMoeTopKGating": _jetmoe_gating,
}
"""Routers whose model gives the experts no ids, keyed by class name (see module docstring)."""

# Config attribute names for the number of experts per token, the routed experts and shared experts
# across v5 configs, used only where no module says it.
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "moe_k", "top_k")
_SHARED_KEYS = ("n_shared_experts", "moe_num_shared_experts", "num_shared_experts")
# JetMoE's attention experts (mixture of attention heads) route too, but the trace records the
# FFN experts, one routing per token per layer; routers under an attention module are skipped.
_ATTENTION_NAMES = ("attn", "attention")


@dataclass
class RoutingPoint:
    """One MoE layer's routing point."""

    layer: int
    """Transformer layer index (the first integer in ``path``)."""
    path: str
    kind: str
    """``experts_input`` or ``router_output``."""
    module: nn.Module = field(repr=False)
    num_experts: int
    top_k: int
    has_weights: bool = True
    ids_arg: tuple[int, str] = (1, "top_k_index")
    """(position, name) of the ids argument of ``experts.forward`` (hidden states are position 0)."""
    weights_arg: tuple[int, str] = (2, "top_k_weights")
    extractor: Extractor | None = field(default=None, repr=False)

    def read_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids (n, k) and weights (n, k) from the experts module's call arguments."""
        ids = _arg(args, kwargs, self.ids_arg)
        weights = _arg(args, kwargs, self.weights_arg)
        return ids, weights

    def read_output(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.extractor is not None
        return self.extractor(output, self.top_k)


def _arg(args: tuple, kwargs: dict, where: tuple[int, str]) -> Any:
    pos, name = where
    return args[pos] if len(args) > pos else kwargs.get(name)


@dataclass
class MoeLayout:
    """What discovery found: the routing points and the model's shape for the manifest."""

    points: list[RoutingPoint]
    info: ModelInfo
    layers_path: str
    notes: list[str] = field(default_factory=list)

    def hooks_description(self) -> list[dict[str, Any]]:
        return [{"layer": p.layer, "module": p.path, "hook": p.kind} for p in self.points]


def discover(model: nn.Module) -> MoeLayout:
    """Find every MoE layer's routing point in ``model`` (a transformers v5 model).

    Raises :class:`CaptureError` when the model has no MoE layer, or an MoE layer whose routing
    cannot be read.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = _model_name(model, config)

    points: list[RoutingPoint] = []
    covered: set[int] = set()
    # Step 1: expert banks that receive the ids (the v5 convention).
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] != "experts" or _under_attention(path):
            continue
        params = _forward_params(module)
        if len(params) < 3:
            continue  # takes no ids (Llama 4, JetMoE attention experts): see step 2
        layer = _layer_index(path)
        if layer is None or layer in covered:
            continue
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        points.append(
            RoutingPoint(
                layer=layer,
                path=path,
                kind="experts_input",
                module=module,
                num_experts=_num_experts(module, parent, text_config, path),
                top_k=_top_k(parent, text_config, path),
                ids_arg=(1, params[1]),
                weights_arg=(2, params[2]),
            )
        )
        covered.add(layer)
    # Step 2: routers of layers whose experts receive no ids.
    for path, module in model.named_modules():
        extractor = ROUTER_EXTRACTORS.get(type(module).__name__)
        if extractor is None or _under_attention(path):
            continue
        layer = _layer_index(path)
        if layer is None or layer in covered:
            continue
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        points.append(
            RoutingPoint(
                layer=layer,
                path=path,
                kind="router_output",
                module=module,
                num_experts=_num_experts(module, parent, text_config, path),
                top_k=_top_k(module, text_config, path),
                extractor=extractor,
            )
        )
        covered.add(layer)

    if not points:
        raise CaptureError(
            f"{name}: no MoE layers found (no `experts` module receiving expert ids and no known router); "
            "moeprof capture needs a Mixture-of-Experts model such as Mixtral, Qwen3-MoE or DeepSeek-V3"
        )
    points.sort(key=lambda p: p.layer)
    _check_uniform(points, name)

    layers_path = _layers_prefix(points[0].path)
    layer_list = model.get_submodule(layers_path)
    num_layers = len(layer_list)
    moe_layers = [p.layer for p in points]
    dense = [i for i in range(num_layers) if i not in covered]
    notes = []
    if any(_under_attention(p) and type(m).__name__ in ROUTER_EXTRACTORS for p, m in model.named_modules()):
        notes.append("attention experts (mixture of attention heads) are routed too but not recorded")

    dtype = next((p.dtype for p in model.parameters()), None)
    info = ModelInfo(
        name=name,
        architecture=_architecture(model, config),
        num_layers=num_layers,
        moe_layers=moe_layers,
        num_experts=points[0].num_experts,
        top_k=points[0].top_k,
        num_shared_experts=_shared_experts(model, points, text_config),
        hidden_size=getattr(text_config, "hidden_size", None) or getattr(text_config, "d_model", None),
        dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
        dense_layers=dense,
    )
    return MoeLayout(points=points, info=info, layers_path=layers_path, notes=notes)


# -- structure helpers ---------------------------------------------------------------------------
def _forward_params(module: nn.Module) -> list[str]:
    try:
        sig = inspect.signature(module.forward)  # follows functools.wraps of use_experts_implementation
    except (TypeError, ValueError):
        return []
    return [
        n
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]


def _under_attention(path: str) -> bool:
    return any(a in part.lower() for part in path.split(".")[:-1] for a in _ATTENTION_NAMES)


def _layer_index(path: str) -> int | None:
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def _layers_prefix(path: str) -> str:
    parts = path.split(".")
    i = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[:i])


def _num_experts(module: nn.Module, parent: nn.Module, config: Any, path: str) -> int:
    for obj in (module, parent):
        n = getattr(obj, "num_experts", None)
        if isinstance(n, int) and n > 0:
            return n
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    raise CaptureError(f"{path}: cannot tell how many experts this MoE layer has")


def _top_k(block: nn.Module, config: Any, path: str) -> int:
    # The block or its router carries top_k in every v5 MoE model; configs name it differently.
    candidates = [block] + [m for n, m in block.named_children() if n != "experts"]
    for obj in candidates:
        k = getattr(obj, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    sub = getattr(config, "ffn_config", None)
    for cfg in (config, sub):
        for key in _TOP_K_KEYS:
            k = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(k, int) and k > 0:
                return k
    raise CaptureError(f"{path}: cannot tell how many experts each token is routed to (top_k)")


def _shared_experts(model: nn.Module, points: list[RoutingPoint], config: Any) -> int:
    """Shared (always-on) experts per MoE layer: from the config where it says, else by structure."""
    for key in _SHARED_KEYS:
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    block_path = points[0].path.rsplit(".", 1)[0]
    block = model.get_submodule(block_path)
    shared = [n for n, _ in block.named_children() if "shared" in n and "gate" not in n]
    return len(shared)


def _check_uniform(points: list[RoutingPoint], name: str) -> None:
    first = points[0]
    for p in points[1:]:
        if (p.num_experts, p.top_k) != (first.num_experts, first.top_k):
            raise CaptureError(
                f"{name}: layer {p.layer} has {p.num_experts} experts / top-{p.top_k} but layer {first.layer} "
                f"has {first.num_experts} / top-{first.top_k}; a trace holds one expert count and top_k"
            )


def _model_name(model: nn.Module, config: Any) -> str:
    path = str(getattr(config, "_name_or_path", "") or "") if config is not None else ""
    if path and (os.path.isabs(path) or path.startswith(".")):
        return os.path.basename(os.path.normpath(path))  # a local directory: its name, not where it sits
    return path or type(model).__name__


def _architecture(model: nn.Module, config: Any) -> str:
    archs = getattr(config, "architectures", None) if config is not None else None
    return archs[0] if archs else type(model).__name__
