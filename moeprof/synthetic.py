"""Synthetic traces with planted structure, for tests, benchmarks and placement evidence.

The routing of a real model shows three things the paper builds on; each is a knob here, so a test
can plant a known amount of it and check that moeprof finds it:

- skew: expert popularity in a layer follows a Zipf law of exponent ``skew`` (0 = uniform);
- domain shift: each domain mixes the global popularity with its own Zipf popularity over a
  domain-specific permutation of experts, weight ``domain_strength`` (0 = all domains alike);
- request signal: each request perturbs its domain's popularity with a Dirichlet draw, weight
  ``request_strength``; its prefill and decode tokens are drawn from the same perturbed popularity,
  which is what makes prefill predict decode beyond the domain's average.

Each token picks ``top_k`` distinct experts by Gumbel-top-k sampling from the request's popularity.
Requests are served in batches of ``batch_size``: one forward pass for their prefill, then one per
decode step, which gives ``batch_id`` the structure of a real ``generate()`` run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from moeprof.errors import UsageError
from moeprof.trace.manifest import ModelInfo
from moeprof.trace.reader import Trace
from moeprof.trace.writer import TraceWriter


def zipf_popularity(num_experts: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """Shape ``(E,)``: Zipf weights ``1/rank**skew`` over a random permutation of experts, summing to 1."""
    weights = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** skew
    out = np.empty(num_experts)
    out[rng.permutation(num_experts)] = weights
    return out / out.sum()


def gumbel_top_k(log_p: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``k`` distinct experts per row without replacement, proportional to ``exp(log_p)``.

    ``log_p`` is ``(T, E)`` or ``(E,)`` broadcast to ``T`` rows via its first axis. Returns ids
    ``(T, k)`` ranked by perturbed score, and their normalised probabilities ``(T, k)``.
    """
    scores = log_p + rng.gumbel(size=log_p.shape)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    ids = np.take_along_axis(top, order, axis=1)
    w = np.exp(np.take_along_axis(log_p, ids, axis=1))
    return ids, (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def generate_trace(
    out: str | Path,
    *,
    num_requests: int = 200,
    domains: Sequence[str] = ("code", "math", "chat", "general"),
    num_layers: int = 4,
    num_experts: int = 32,
    top_k: int = 4,
    prompt_tokens: tuple[int, int] = (32, 128),
    decode_tokens: tuple[int, int] = (16, 64),
    skew: float = 1.0,
    domain_strength: float = 0.7,
    request_strength: float = 0.3,
    request_concentration: float = 20.0,
    batch_size: int = 16,
    first_moe_layer: int = 0,
    hidden_size: int = 1024,
    seed: int = 0,
    force: bool = False,
    shard_rows: int = 1 << 20,
    first_request_id: int = 0,
) -> Trace:
    """Write a per-token trace with planted skew, domain shift and request signal; return it opened.

    Request ``r`` has domain ``domains[r % len(domains)]`` (balanced), a prompt length uniform in
    ``prompt_tokens`` and a decode length uniform in ``decode_tokens`` (both inclusive). MoE layers are
    ``first_moe_layer .. first_moe_layer + num_layers - 1``; layers before them are recorded as dense.
    Request ids start at ``first_request_id`` (traces of several "ranks" that ``moeprof merge`` joins).
    """
    if not 1 <= top_k <= num_experts:
        raise UsageError(f"top_k must be in 1..num_experts ({num_experts}), got {top_k}")
    if num_requests < 1 or not domains:
        raise UsageError("need at least one request and one domain")
    for name, value in (("domain_strength", domain_strength), ("request_strength", request_strength)):
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{name} must be in [0, 1], got {value}")
    rng = np.random.default_rng(seed)
    layers = list(range(first_moe_layer, first_moe_layer + num_layers))
    # Step 1: popularity per layer (global) and per domain x layer.
    global_p = np.stack([zipf_popularity(num_experts, skew, rng) for _ in layers])  # (L, E)
    domain_p = {
        d: (1 - domain_strength) * global_p
        + domain_strength * np.stack([zipf_popularity(num_experts, skew, rng) for _ in layers])
        for d in domains
    }
    model = ModelInfo(
        name="synthetic",
        architecture="synthetic",
        num_experts=num_experts,
        top_k=top_k,
        moe_layers=layers,
        num_layers=layers[-1] + 1,
        dense_layers=list(range(first_moe_layer)),
        hidden_size=hidden_size,
        dtype="bfloat16",
    )
    settings = dict(
        num_requests=num_requests, domains=list(domains), skew=skew, domain_strength=domain_strength,
        request_strength=request_strength, request_concentration=request_concentration,
        batch_size=batch_size, seed=seed,
    )
    writer = TraceWriter(
        out, model=model, source="synthetic", capture=settings, force=force, shard_rows=shard_rows,
        request_shards=True,
        notes=["synthetic trace with planted structure (moeprof.synthetic.generate_trace)"],
    )
    with writer:
        # Step 2: per request, its popularity and lengths.
        n_prompt = rng.integers(prompt_tokens[0], prompt_tokens[1] + 1, size=num_requests)
        n_decode = rng.integers(decode_tokens[0], decode_tokens[1] + 1, size=num_requests)
        batch_id = 0
        for start in range(0, num_requests, batch_size):
            members = range(start, min(start + batch_size, num_requests))
            longest = max(int(n_decode[r]) for r in members)
            for r in members:
                domain = domains[r % len(domains)]
                p = domain_p[domain]
                dirichlet = np.stack([rng.dirichlet(request_concentration * p[i] + 1e-3) for i in range(len(layers))])
                q = (1 - request_strength) * p + request_strength * dirichlet
                log_q = np.log(np.maximum(q, 1e-12))
                P, D = int(n_prompt[r]), int(n_decode[r])
                writer.set_request(first_request_id + r, domain, dataset="synthetic", prompt_tokens=P, decode_tokens=D)
                T = P + D
                steps = np.concatenate([np.zeros(P, np.int32), np.arange(1, D + 1, dtype=np.int32)])
                batches = np.concatenate(
                    [np.full(P, batch_id, np.int64), batch_id + np.arange(1, D + 1, dtype=np.int64)]
                )
                # Step 3: each token picks top_k distinct experts in every MoE layer.
                for i, layer in enumerate(layers):
                    ids, w = gumbel_top_k(np.broadcast_to(log_q[i], (T, num_experts)), top_k, rng)
                    writer.write_routing(
                        dict(
                            request_id=first_request_id + r, step=steps, phase=(steps > 0).astype(np.int8), pos=np.arange(T),
                            layer=layer, experts=ids, weights=w, batch_id=batches,
                        )
                    )
            batch_id += 1 + longest
    return Trace.open(out)
