"""Tiny random-weight transformers MoE models built from their config classes (no download).

Each builder returns ``(model, expected)`` where ``expected`` says what discovery must find, taken
from the config (not from the model structure): MoE layers, dense layers, shared experts, top_k,
experts, and the rule that recomputes the router's choice from ``output_router_logits``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers as tf

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    eos_token_id=None,
    bos_token_id=None,
)


@dataclass
class Expected:
    moe_layers: list[int]
    dense_layers: list[int]
    num_experts: int
    top_k: int
    shared: int = 0
    rule: str = "topk_logits"
    """How the router's choice follows from its logits: ``topk_logits`` (in order), ``deepseek``,
    ``ernie_bias`` or ``jetmoe_hook`` (logits read from the gating module's own output)."""
    hook: str = "experts_input"
    extra: dict = field(default_factory=dict)


def _make(config_cls, **kw):
    args = dict(COMMON)
    args.update(kw)
    return config_cls(**args)


def mixtral():
    c = _make(tf.MixtralConfig, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    return c, Expected([0, 1], [], 4, 2)


def qwen2_moe():
    c = _make(
        tf.Qwen2MoeConfig,
        num_hidden_layers=3,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        mlp_only_layers=[1],
    )
    return c, Expected([0, 2], [1], 6, 2, shared=1)


def qwen3_moe():
    c = _make(
        tf.Qwen3MoeConfig,
        num_hidden_layers=3,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        decoder_sparse_step=2,
    )
    # decoder_sparse_step=2: layers with (i + 1) % 2 == 0 are sparse
    return c, Expected([1], [0, 2], 8, 2)


def olmoe():
    c = _make(tf.OlmoeConfig, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2)
    return c, Expected([0, 1], [], 8, 2)


def deepseek_v3():
    c = _make(
        tf.DeepseekV3Config,
        num_hidden_layers=3,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        n_shared_experts=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )
    return c, Expected([1, 2], [0], 8, 2, shared=1, rule="deepseek")


def llama4_text():
    c = _make(
        tf.Llama4TextConfig,
        num_hidden_layers=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=1,
        intermediate_size_mlp=64,
        moe_layers=[1],
    )
    return c, Expected([1], [0], 4, 1, shared=1, hook="router_output")


def gpt_oss():
    c = _make(tf.GptOssConfig, num_hidden_layers=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2)
    return c, Expected([0, 1], [], 4, 2)


def granitemoe():
    c = _make(tf.GraniteMoeConfig, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    return c, Expected([0, 1], [], 4, 2)


def dbrx():
    c = tf.DbrxConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=128,
        attn_config=dict(kv_n_heads=2, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
        pad_token_id=0,
    )
    # transformers 5.23's DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig lacks.
    c.attn_config.rope_theta = 10000.0
    return c, Expected([0, 1], [], 4, 2)


def jetmoe():
    c = _make(tf.JetMoeConfig, num_hidden_layers=2, kv_channels=8, num_local_experts=4, num_experts_per_tok=2)
    return c, Expected([0, 1], [], 4, 2, rule="jetmoe_hook", hook="router_output")


def ernie4_5_moe():
    c = _make(
        tf.Ernie4_5_MoeConfig,
        num_hidden_layers=3,
        moe_num_experts=6,
        moe_k=2,
        moe_intermediate_size=16,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
    )
    return c, Expected([1, 2], [0], 6, 2, shared=1, rule="ernie_bias")


def phimoe():
    c = _make(tf.PhimoeConfig, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    return c, Expected([0, 1], [], 4, 2)


BUILDERS = {
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": qwen3_moe,
    "olmoe": olmoe,
    "deepseek_v3": deepseek_v3,
    "llama4_text": llama4_text,
    "gpt_oss": gpt_oss,
    "granitemoe": granitemoe,
    "dbrx": dbrx,
    "jetmoe": jetmoe,
    "ernie4_5_moe": ernie4_5_moe,
    "phimoe": phimoe,
}


def deepseek_choice(model, logits: torch.Tensor, layer: int) -> torch.Tensor:
    """DeepSeek-V3 routing: sigmoid scores + correction bias, best ``topk_group`` groups, then top-k."""
    cfg = model.config
    gate = model.model.layers[layer].mlp.gate
    n, E, G = logits.shape[0], cfg.n_routed_experts, cfg.n_group
    scores = torch.sigmoid(logits.float()) + gate.e_score_correction_bias
    group_score = scores.view(n, G, E // G).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros(n, G).scatter(1, group_score.topk(cfg.topk_group, dim=-1).indices, 1.0)
    keep = keep.repeat_interleave(E // G, dim=1).bool()
    return torch.topk(scores.masked_fill(~keep, float("-inf")), cfg.num_experts_per_tok, dim=-1).indices


def build(name: str, seed: int = 0):
    """``(model, expected)`` with seeded random weights, in eval mode, float32."""
    config, expected = BUILDERS[name]()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    # Random init leaves some parameters at zero or uninitialised; give every float parameter and
    # buffer seeded values so that routing is decided by clear margins.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "norm" not in pname else 0.05) + ("norm" in pname))
        if name == "ernie4_5_moe":
            # a non-zero correction bias makes the ids differ from a plain top-k (recomputed in the test)
            for layer in expected.moe_layers:
                model.model.layers[layer].mlp.gate.moe_statics.e_score_correction_bias.copy_(
                    torch.rand(1, expected.num_experts, generator=g) * 0.5
                )
    return model, expected


def gate_logits_hooks(model, moe_layers: list[int], num_experts: int):
    """Record each MoE layer's router logits from its gate's own weights, whatever the library returns.

    ``output_router_logits`` is not returned by every model in every transformers release (5.17 drops it
    for DeepSeek-V3, Llama 4, Granite and DBRX), so the known answers are recomputed from first
    principles: a forward pre-hook on the layer's router linear (the one parameter of shape
    ``(num_experts, hidden)`` in that decoder layer, outside the experts) reads its input, and the
    logits are ``input @ weight.T (+ bias)``. Returns ``(logits by layer, hook handles)``.
    """
    hidden = model.config.hidden_size
    layers = _decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer in moe_layers:
        gate = _router_linear(layers[layer], num_experts, hidden)

        def pre_hook(mod, args, kwargs, layer=layer, gate=gate):
            x = args[0] if args else next(iter(kwargs.values()))
            w = gate.weight
            logits = torch.nn.functional.linear(x.reshape(-1, hidden).float(), w.float())
            bias = getattr(gate, "bias", None)
            if isinstance(bias, torch.Tensor) and bias.shape == (num_experts,):
                logits = logits + bias.float()
            seen[layer] = logits.detach()

        handles.append(gate.register_forward_pre_hook(pre_hook, with_kwargs=True))
    return seen, handles


def _decoder_layers(model):
    for path in ("model.layers", "transformer.blocks"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AssertionError(f"no decoder layers found in {type(model).__name__}")


def _router_linear(layer_module, num_experts: int, hidden: int):
    found = []
    for name, mod in layer_module.named_modules():
        w = getattr(mod, "weight", None)
        if "experts" in name.split(".") or not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        if tuple(w.shape) == (num_experts, hidden):
            found.append((name, mod))
    assert len(found) == 1, f"router linear of shape ({num_experts}, {hidden}): found {[n for n, _ in found]}"
    return found[0][1]


def cache_kw(model) -> str:
    """The name this transformers gives a forward's KV cache argument: ``cache`` from 5.24 (where
    ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
