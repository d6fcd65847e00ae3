"""Prefill -> decode correlation: does a request's prompt predict which experts its answer will use?

For request r and layer l, x = its prefill count vector and y = its decode count vector ``(E,)``:

- per request: Pearson and Spearman (average ranks for ties) of x and y, then the mean over requests,
  per layer. A request whose x or y is constant (no decode tokens, say) has no correlation and is
  left out of the mean (``requests`` says how many were used);
- aggregate: the same correlations between sum_r x and sum_r y (the published anchors: Maverick
  0.82, Qwen3 0.68, DeepSeek-V3 0.55);
- controls: x of r against y of another request r' of the same domain, and of another domain
  (r' chosen with a seeded generator). Global popularity alone already correlates x with any y; the
  gap between "own" and "same domain" is the request-specific signal;
- recall@m: |top_m(y) & top_m(x)| / m, mean over requests (ties broken by lower expert id).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis of ``x, y (..., E)``; NaN where either is constant."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    num = (xc * yc).sum(axis=-1)
    den = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(r, -1.0, 1.0)


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis (average ranks for ties)."""
    return pearson(average_ranks(x), average_ranks(y))


def order_desc(a: np.ndarray) -> np.ndarray:
    """Experts from most to least loaded along the last axis; ties in order of expert id (stable)."""
    a = np.asarray(a)
    if a.dtype.kind in "iu" and a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi < 1 << 16:
            # hi - a ascending is a descending, ties alike; numpy sorts 8- and 16-bit integers by radix
            # (4x faster than counts of int32 at 256 experts), with the same stable order
            return np.argsort((hi - a).astype(np.uint8 if hi < 1 << 8 else np.uint16), axis=-1, kind="stable")
    return np.argsort(-a, axis=-1, kind="stable")


def average_ranks(a: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """``float32`` ranks along the last axis, 1 = most loaded, ties sharing their mean rank.

    Ranking from the top rather than the bottom reverses every rank the same way, which leaves a
    Pearson correlation of ranks (Spearman) unchanged. ``order`` is :func:`order_desc` of ``a`` if
    already computed (one sort then serves ranks and top-m alike).
    """
    a = np.asarray(a)
    shape, E = a.shape, a.shape[-1]
    flat = a.reshape(-1, E)
    order = (order_desc(a) if order is None else order).reshape(-1, E)
    n = flat.shape[0]
    if n == 0 or E == 0:
        return np.zeros(shape, np.float32)
    sorted_vals = np.take_along_axis(flat, order, axis=1)
    new_group = np.ones(sorted_vals.shape, bool)
    new_group[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    group = np.cumsum(new_group, axis=1) - 1 + (np.arange(n) * E)[:, None]  # global group ids
    size = np.bincount(group.ravel(), minlength=n * E)
    start = np.cumsum(size) - size - (np.arange(n * E) // E) * E  # group's first position in its row
    mean_rank = (start + (size - 1) / 2.0 + 1.0).astype(np.float32)
    ranks = np.empty(flat.shape, np.float32)
    np.put_along_axis(ranks, order, mean_rank[group], axis=1)
    return ranks.reshape(shape)


def recall_at(x: np.ndarray, y: np.ndarray, m: int) -> np.ndarray:
    """``(...)`` share of y's top-m experts that are among x's top-m; NaN where x or y has no load."""
    return _recall(order_desc(x)[..., :m], order_desc(y)[..., :m], _empty(x) | _empty(y))


def _recall(top_x: np.ndarray, top_y: np.ndarray, empty: np.ndarray) -> np.ndarray:
    m = top_x.shape[-1]
    hit = (top_y[..., :, None] == top_x[..., None, :]).any(axis=-1).sum(axis=-1) / m
    return np.where(empty, np.nan, hit)


def _empty(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).sum(axis=-1) == 0


def control_partners(request_domain: np.ndarray, same: bool, seed: int) -> np.ndarray:
    """For each request, another request of the same (or another) domain; -1 where there is none."""
    rng = np.random.default_rng(seed)
    R = request_domain.size
    out = np.full(R, -1, np.int64)
    for r in range(R):
        if request_domain[r] < 0:
            continue
        mask = (request_domain == request_domain[r]) if same else (request_domain != request_domain[r])
        mask &= request_domain >= 0
        mask[r] = False
        cand = np.flatnonzero(mask)
        if cand.size:
            out[r] = cand[rng.integers(cand.size)]
    return out


def _unit(a: np.ndarray) -> np.ndarray:
    """``float32`` vectors along the last axis centred and scaled to unit length; NaN where constant,
    so that the dot product of two is their Pearson correlation (NaN when either is constant)."""
    a = np.asarray(a, np.float64)
    c = a - a.mean(axis=-1, keepdims=True)
    norm = np.sqrt((c * c).sum(axis=-1, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (c / np.where(norm > 0, norm, np.nan)).astype(np.float32)


def _mean_over_requests(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``v (R, L)`` -> mean over finite entries per layer, and how many there were."""
    ok = np.isfinite(v)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore"):
        mean = np.where(n > 0, np.where(ok, v, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan)
    return mean, n


def correlations(prefill: np.ndarray, decode: np.ndarray, request_domain: np.ndarray, layers: Sequence[int],
                 recall_m: Sequence[int], seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per-layer and per-request prefill -> decode statistics from counts ``(R, L, E)``.

    Returns (per_layer, per_request). ``per_layer`` columns: pearson / spearman (mean over requests),
    requests (how many had both vectors non-constant), aggregate_pearson / aggregate_spearman,
    same_domain_pearson / same_domain_spearman, other_domain_pearson / other_domain_spearman (NaN
    when no partner exists), recall_at_{m} for each m. ``per_request``: request index, layer, pearson,
    spearman.
    """
    R, L, E = prefill.shape
    B = 128  # requests per block: temporaries of (B, L, E)
    # Step 1: one stable sort per count vector gives its average ranks (Spearman) and its top-m
    # experts (recall); centring and scaling each vector (and each rank vector) once to unit length
    # turns every Pearson correlation below, own request or control, into one dot product. Decode
    # vectors are kept for every request (the controls pair a request with a random other one);
    # prefill vectors only for a block of requests at a time.
    m_max = max(recall_m, default=0)
    zy, zry = np.empty((R, L, E), np.float32), np.empty((R, L, E), np.float32)
    top_y = np.empty((R, L, m_max), np.int16 if E <= 1 << 15 else np.int64)
    for i in range(0, R, B):
        block = decode[i : i + B]
        order = order_desc(block)
        zy[i : i + B] = _unit(block)
        zry[i : i + B] = _unit(average_ranks(block, order))
        top_y[i : i + B] = order[..., :m_max]

    def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.clip(np.einsum("rle,rle->rl", a, b, dtype=np.float64), -1.0, 1.0)

    # Step 2: correlations of request r's prefill with a decode vector: its own, then the controls'.
    controls = {name: control_partners(request_domain, same, seed + (0 if same else 1))
                for name, same in (("same_domain", True), ("other_domain", False))}
    own_p, own_s = np.empty((R, L)), np.empty((R, L))
    ctrl = {name: (np.full((R, L), np.nan), np.full((R, L), np.nan)) for name in controls}
    recall = {m: np.empty((R, L)) for m in recall_m}
    for i in range(0, R, B):
        b = slice(i, i + B)
        block = prefill[b]
        order = order_desc(block)
        zx, zrx, top_x = _unit(block), _unit(average_ranks(block, order)), order[..., :m_max]
        own_p[b], own_s[b] = corr(zx, zy[b]), corr(zrx, zry[b])
        for name, partner in controls.items():
            has = np.flatnonzero(partner[b] >= 0)
            if has.size:
                ctrl[name][0][i + has] = corr(zx[has], zy[partner[b][has]])
                ctrl[name][1][i + has] = corr(zrx[has], zry[partner[b][has]])
        empty = _empty(block) | _empty(decode[b])
        for m in recall_m:
            recall[m][b] = _recall(top_x[..., :m], top_y[b][..., :m], empty)
    del zy, zry, top_y
    cols: dict[str, object] = {"layer": pl.Series(list(layers), dtype=pl.Int16)}
    cols["pearson"], n = _mean_over_requests(own_p)
    cols["spearman"], _ = _mean_over_requests(own_s)
    cols["requests"] = n.astype(np.int64)
    agg_x, agg_y = prefill.sum(axis=0), decode.sum(axis=0)
    cols["aggregate_pearson"] = pearson(agg_x, agg_y)
    cols["aggregate_spearman"] = spearman(agg_x, agg_y)
    for name, (p, s) in ctrl.items():
        cols[f"{name}_pearson"], _ = _mean_over_requests(p)
        cols[f"{name}_spearman"], _ = _mean_over_requests(s)
    for m in recall_m:
        cols[f"recall_at_{m}"], _ = _mean_over_requests(recall[m])
    per_layer = pl.DataFrame(cols)
    per_request = pl.DataFrame(
        {
            "request": np.repeat(np.arange(R), L),
            "layer": pl.Series(np.tile(np.asarray(layers), R), dtype=pl.Int16),
            "pearson": own_p.ravel(),
            "spearman": own_s.ravel(),
        }
    )
    return per_layer, per_request
