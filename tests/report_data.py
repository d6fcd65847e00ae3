"""Traces and analyze outputs for the report / check / diff tests (built once per test module).

``hand_trace``: numbers you can check by eye. 2 requests (domains ``a``, ``b``), 8 prefill and 8
decode tokens each, 2 MoE layers of 4 experts, top-1. Over its 32 tokens:

- layer 0: experts 0, 1, 2, 3 get 20, 4, 4, 4 tokens -> max/mean = 20 / 8 = 2.5, hot set {0};
- layer 1: 8 each -> max/mean = 1.0.

``swap03=True`` relabels experts 0 and 3 in layer 0 (20 tokens now go to expert 3): the same
imbalance, hot set {3}, and JS divergence from the original of exactly
0.5 KL(p||m) + 0.5 KL(q||m) with p = (.625, .125, .125, .125), q its mirror.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moeprof.trace.manifest import ModelInfo
from moeprof.trace.writer import TraceWriter

LAYER0 = [0] * 20 + [1] * 4 + [2] * 4 + [3] * 4


def hand_trace(out: Path, *, swap03: bool = False, num_experts: int = 4) -> Path:
    model = ModelInfo(name="hand", architecture="hand-built", num_experts=num_experts, top_k=1, moe_layers=[0, 1],
                      num_layers=2, hidden_size=8, dtype="bfloat16")
    layer0 = list(LAYER0)
    if swap03:
        layer0 = [{0: 3, 3: 0}.get(e, e) for e in layer0]
    # Interleave so each request sees a mix: token t goes to request t % 2.
    with TraceWriter(out, model=model, source="synthetic", force=True) as w:
        for r, domain in ((0, "a"), (1, "b")):
            w.set_request(r, domain, prompt_tokens=8, decode_tokens=8)
            idx = np.arange(r, 32, 2)  # this request's 16 tokens
            pos = np.arange(16)
            step = np.where(pos < 8, 0, pos - 7).astype(np.int32)
            for layer, experts in ((0, np.asarray(layer0)[idx]), (1, idx % 4)):
                w.write_routing(dict(
                    request_id=r, step=step, phase=(step > 0).astype(np.int8), pos=pos, layer=layer,
                    experts=experts.reshape(-1, 1), weights=None, batch_id=step.astype(np.int64),
                ))
    return Path(out)


def synthetic_trace(out: Path, seed: int = 1, **kw) -> Path:
    from moeprof.synthetic import generate_trace

    opts = dict(num_requests=40, num_layers=3, num_experts=16, top_k=2, prompt_tokens=(16, 48),
                decode_tokens=(8, 24), batch_size=8)
    opts.update(kw)
    generate_trace(out, seed=seed, force=True, **opts)
    return Path(out)


def analyze_to(trace: Path, out: Path) -> Path:
    """``moeprof analyze TRACE --out OUT`` through the library; returns OUT."""
    from moeprof.analysis.run import analyze
    from moeprof.report.plots import write_plots

    analyze(trace, out=out, force=True, batch_sizes=(1, 8, 64), writers=[write_plots])
    return Path(out)
