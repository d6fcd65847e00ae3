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

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import polars as pl


MAX_THREADS = 4
"""Threads of :func:`correlations` at most, whatever the cores: each holds a block of requests' temporaries."""


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
    if a.size == 0:
        return np.zeros(a.shape, np.float32)
    idx, start, length, row, E = _runs(a, order)
    mean_rank = (start - row * E) + (length - 1) / 2.0 + 1.0  # a run's first position in its row, 0-based
    return _scatter(mean_rank.astype(np.float32), length, idx, a.shape)


def unit_ranks(a: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """``_unit(average_ranks(a, order))``, the same float32 values, from the runs of tied values alone.

    Average ranks of E values sum to E(E+1)/2 whatever the ties, so their mean is (E+1)/2 and their
    centred squares sum to (E^3 - E - sum over ties of (t^3 - t)) / 12: every one of these is a
    multiple of 1/4 far below 2^53, exact in float64 however it is summed, so the unit vectors are
    those :func:`_unit` computes, bit for bit, without its passes over every value (measured 2x
    fewer CPU seconds for the Spearman ranks of prefill -> decode at DeepSeek-V3 shape).
    """
    a = np.asarray(a)
    if a.size == 0:
        return _unit(average_ranks(a, order))
    idx, start, length, row, E = _runs(a, order)
    n = a.size // E
    t = length.astype(np.float64)
    ties = np.bincount(row, weights=t * t * t - t, minlength=n)  # integers below 2^53: exact
    norm = np.sqrt((float(E) ** 3 - E - ties) / 12.0)
    centred = (start - row * E) + (length - 1) / 2.0 + 1.0 - (E + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (centred / np.where(norm > 0, norm, np.nan)[row]).astype(np.float32)
    return _scatter(z, length, idx, a.shape)


def _runs(a: np.ndarray, order: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """The runs of equal values of ``a (..., E)`` sorted by :func:`order_desc` (``order``), every row
    in turn: ``idx`` (the flat index in ``a`` of each sorted position), each run's ``start`` (its
    first sorted position, flat), ``length``, ``row``, and E."""
    E = a.shape[-1]
    flat = a.reshape(-1)
    n = flat.size // E
    order = (order_desc(a) if order is None else order).reshape(n, E)
    idx = (order + (np.arange(n, dtype=order.dtype) * E)[:, None]).reshape(-1)
    srt = flat[idx]
    new = np.empty(srt.size, bool)
    np.not_equal(srt[1:], srt[:-1], out=new[1:])
    new[::E] = True  # a row's first value starts a run
    start = np.flatnonzero(new)
    length = np.diff(start, append=srt.size)
    return idx, start, length, start // E, E


def _scatter(values: np.ndarray, length: np.ndarray, idx: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Each run's value at every position of the run, put back in ``a``'s order."""
    out = np.empty(idx.size, values.dtype)
    out[idx] = np.repeat(values, length)
    return out.reshape(shape)


def recall_at(x: np.ndarray, y: np.ndarray, m: int) -> np.ndarray:
    """``(...)`` share of y's top-m experts that are among x's top-m; NaN where x or y has no load."""
    return _recall(order_desc(x)[..., :m], order_desc(y)[..., :m], _empty(x) | _empty(y))


def _recall(top_x: np.ndarray, top_y: np.ndarray, empty: np.ndarray) -> np.ndarray:
    m = top_x.shape[-1]
    hit = (top_y[..., :, None] == top_x[..., None, :]).any(axis=-1).sum(axis=-1) / m
    return np.where(empty, np.nan, hit)


def _recalls(top_x: np.ndarray, top_y: np.ndarray, empty: np.ndarray, ms: Sequence[int]) -> dict[int, np.ndarray]:
    """:func:`_recall` for each m in ``ms`` from the top-max(ms) experts ``top_x, top_y (..., max(ms))``:
    each of x's top experts is given its place, y's top experts read theirs, and the hits at m are
    y's first m that x places below m (m x m comparisons per vector for each m cost 10x more)."""
    m_max = top_x.shape[-1]
    out = {m: np.where(empty, np.nan, 0.0) for m in ms}
    if m_max == 0:
        return out
    n = top_x.size // m_max
    width = int(max(top_x.max(), top_y.max())) + 1
    place = np.full((n, width), m_max, np.int32)
    rows = np.arange(n)[:, None]
    place[rows, top_x.reshape(n, m_max)] = np.arange(m_max, dtype=np.int32)
    got = place[rows, top_y.reshape(n, m_max)]  # (n, m_max) x's place of each of y's top experts
    for m in ms:
        hit = (got[:, :m] < m).sum(axis=-1).reshape(empty.shape) / m
        out[m] = np.where(empty, np.nan, hit)
    return out


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
    c = np.array(a, np.float64)  # a copy of its own, worked on in place (fresh temporaries cost page faults)
    c -= c.mean(axis=-1, keepdims=True)
    norm = np.square(c).sum(axis=-1, keepdims=True)
    np.sqrt(norm, out=norm)
    with np.errstate(invalid="ignore", divide="ignore"):
        c /= np.where(norm > 0, norm, np.nan)
    return c.astype(np.float32)


class _Rows:
    """Rows ``rows`` of counts ``(S, L, E)``, indexed by slices of rows (copied a block at a time)."""

    def __init__(self, counts: np.ndarray, rows: np.ndarray | None) -> None:
        self.counts, self.rows = counts, rows
        self.shape = counts.shape if rows is None else (len(rows),) + counts.shape[1:]

    def __getitem__(self, b: slice) -> np.ndarray:
        return self.counts[b] if self.rows is None else self.counts[self.rows[b]]

    def sum0(self) -> np.ndarray:
        """The sum over the rows, as numpy sums them whole; integer counts a block at a time (exact)."""
        if self.rows is None or self.counts.dtype.kind not in "iu":
            return self[slice(None)].sum(axis=0)
        out = np.zeros(self.shape[1:], np.int64 if self.counts.dtype.kind == "i" else np.uint64)
        for i in range(0, self.shape[0], 1024):
            out += self[slice(i, i + 1024)].sum(axis=0)
        return out


def _mean_over_requests(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``v (R, L)`` -> mean over finite entries per layer, and how many there were."""
    ok = np.isfinite(v)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore"):
        mean = np.where(n > 0, np.where(ok, v, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan)
    return mean, n


def correlations(prefill: np.ndarray, decode: np.ndarray, request_domain: np.ndarray, layers: Sequence[int],
                 recall_m: Sequence[int], seed: int, threads: int | None = None,
                 rows: np.ndarray | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per-layer and per-request prefill -> decode statistics from counts ``(R, L, E)``.

    Returns (per_layer, per_request). ``per_layer`` columns: pearson / spearman (mean over requests),
    requests (how many had both vectors non-constant), aggregate_pearson / aggregate_spearman,
    same_domain_pearson / same_domain_spearman, other_domain_pearson / other_domain_spearman (NaN
    when no partner exists), recall_at_{m} for each m. ``per_request``: request index, layer, pearson,
    spearman. Blocks of requests run on ``threads`` threads (default: CPU count); the result does not
    depend on it. ``rows``: the requests are these rows of ``prefill`` and ``decode`` (and
    ``request_domain`` is theirs), read a block at a time rather than copied whole.
    """
    prefill, decode = _Rows(prefill, rows), _Rows(decode, rows)
    R, L, E = prefill.shape
    B = 128  # requests per block: temporaries of (B, L, E)
    blocks = range(0, R, B)
    # Blocks of requests are independent: they run on `threads` threads (numpy's sorts and sums release
    # the GIL), each block computed exactly as alone, so the numbers do not depend on the threads. Each
    # thread holds one block's temporaries (about 0.1 GB at DeepSeek-V3 shape): at most MAX_THREADS.
    threads = max(1, min(threads or os.cpu_count() or 1, len(blocks), MAX_THREADS))
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moeprof-ranks") if threads > 1 else None

    def each(fn: Callable[[int], None]) -> None:
        for _ in (map(fn, blocks) if pool is None else pool.map(fn, blocks)):
            pass

    # Step 1: one stable sort per count vector gives its average ranks (Spearman) and its top-m
    # experts (recall); centring and scaling each vector (and each rank vector) once to unit length
    # turns every Pearson correlation below, own request or control, into one dot product. Decode
    # vectors are kept for every request (the controls pair a request with a random other one);
    # prefill vectors only for a block of requests at a time.
    m_max = max(recall_m, default=0)
    zy, zry = np.empty((R, L, E), np.float32), np.empty((R, L, E), np.float32)
    top_y = np.empty((R, L, m_max), np.int16 if E <= 1 << 15 else np.int64)

    def decode_block(i: int) -> None:
        block = decode[i : i + B]
        order = order_desc(block)
        zy[i : i + B] = _unit(block)
        zry[i : i + B] = unit_ranks(block, order)
        top_y[i : i + B] = order[..., :m_max]

    def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.clip(np.einsum("rle,rle->rl", a, b, dtype=np.float64), -1.0, 1.0)

    # Step 2: correlations of request r's prefill with a decode vector: its own, then the controls'.
    controls = {name: control_partners(request_domain, same, seed + (0 if same else 1))
                for name, same in (("same_domain", True), ("other_domain", False))}
    own_p, own_s = np.empty((R, L)), np.empty((R, L))
    ctrl = {name: (np.full((R, L), np.nan), np.full((R, L), np.nan)) for name in controls}
    recall = {m: np.empty((R, L)) for m in recall_m}

    def prefill_block(i: int) -> None:
        b = slice(i, i + B)
        block = prefill[b]
        order = order_desc(block)
        zx, zrx = _unit(block), unit_ranks(block, order)
        own_p[b], own_s[b] = corr(zx, zy[b]), corr(zrx, zry[b])
        for name, partner in controls.items():
            has = np.flatnonzero(partner[b] >= 0)
            if has.size:
                ctrl[name][0][i + has] = corr(zx[has], zy[partner[b][has]])
                ctrl[name][1][i + has] = corr(zrx[has], zry[partner[b][has]])
        empty = _empty(block) | _empty(decode[b])
        for m, r in _recalls(order[..., :m_max], top_y[b], empty, recall_m).items():
            recall[m][b] = r

    try:
        each(decode_block)
        each(prefill_block)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    zy = zry = top_y = None  # freed (the block functions above are done with them)
    cols: dict[str, object] = {"layer": pl.Series(list(layers), dtype=pl.Int16)}
    cols["pearson"], n = _mean_over_requests(own_p)
    cols["spearman"], _ = _mean_over_requests(own_s)
    cols["requests"] = n.astype(np.int64)
    agg_x, agg_y = prefill.sum0(), decode.sum0()
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
