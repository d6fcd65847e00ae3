"""The synthetic generator plants what it says: shapes, lengths, batches, domain shift."""

from __future__ import annotations

import numpy as np
import polars as pl

from moeprof.synthetic import generate_trace


def test_rows_lengths_and_batches(tmp_path):
    t = generate_trace(tmp_path / "s", num_requests=10, num_layers=2, num_experts=8, top_k=2,
                       prompt_tokens=(3, 5), decode_tokens=(1, 4), batch_size=4, first_moe_layer=1, seed=1)
    rows = t.routing().collect()
    req = t.requests()
    assert rows.height == 2 * int((req["prompt_tokens"] + req["decode_tokens"]).sum())
    assert t.model.moe_layers == [1, 2] and t.model.dense_layers == [0]
    # experts within a token are distinct
    e = np.stack(rows["experts"].to_numpy())
    assert (e[:, 0] != e[:, 1]).all()
    # one forward pass carries a batch's prefill; decode steps of one batch share ids per step
    pre = rows.filter(pl.col("step") == 0)
    assert pre.group_by("batch_id").agg(pl.col("request_id").n_unique())["request_id"].max() == 4
    assert t.complete


def test_domain_strength_moves_popularity(tmp_path):
    def spread(strength):
        t = generate_trace(tmp_path / f"s{strength}", num_requests=40, num_layers=1, num_experts=16, top_k=2,
                           domain_strength=strength, domains=("a", "b"), seed=3)
        rows = t.routing().collect().join(t.requests().select("request_id", "domain"), on="request_id")
        counts = {}
        for d in ("a", "b"):
            e = np.stack(rows.filter(pl.col("domain") == d)["experts"].to_numpy()).ravel()
            counts[d] = np.bincount(e, minlength=16) / e.size
        return np.abs(counts["a"] - counts["b"]).sum()

    assert spread(0.9) > 2 * spread(0.0)
