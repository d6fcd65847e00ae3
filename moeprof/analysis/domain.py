"""Domain shift: how differently requests of different domains (code, math, chat, ...) use experts.

With p(d, l, .) = n(d, l, .) / sum_e n(d, l, e), the expert distribution of domain d in layer l:

- ``js``: Jensen-Shannon divergence, base 2, in [0, 1], between every pair of domains per layer;
  0 for identical distributions, 1 for disjoint supports;
- ``jaccard``: |H(a) & H(b)| / |H(a) | H(b)| of the hot sets H = top 10% experts (ceil(0.1 E));
- ``lift(d, l, e)`` = p(d, l, e) / p(l, e), p(l, .) over every selected token; experts with lift > 2
  are the domain's "specialists" in that layer;
- classification: a request's domain predicted from its prefill counts alone (per layer, L2-normalised,
  concatenated over layers), by the nearest L2-normalised domain centroid learnt on a seeded held-out
  split by request; the paper reports > 94% accuracy.
"""

from __future__ import annotations

from itertools import combinations
from typing import Callable, Sequence

import numpy as np
import polars as pl

from moeprof.analysis.load import hot_count

SPECIALIST_LIFT = 2.0


def distributions(counts: np.ndarray) -> np.ndarray:
    """Normalise counts ``(..., E)`` to distributions; an all-zero vector stays zero."""
    counts = np.asarray(counts, dtype=np.float64)
    s = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, s, out=np.zeros_like(counts), where=s > 0)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence, base 2, of distributions ``p, q (..., E)`` -> ``(...)`` in [0, 1]."""
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> np.ndarray:
        ratio = np.divide(a, m, out=np.ones_like(a), where=(a > 0) & (m > 0))
        return (a * np.log2(ratio)).sum(axis=-1)

    return np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, 1.0)


def hot_set(counts: np.ndarray) -> np.ndarray:
    """Boolean mask ``(..., E)`` of the top 10% experts (ties broken by lower expert id)."""
    E = counts.shape[-1]
    h = hot_count(E)
    order = np.argsort(-np.asarray(counts, np.float64), axis=-1, kind="stable")[..., :h]
    mask = np.zeros(counts.shape, bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def pairwise_shift(domain_counts: np.ndarray, domains: Sequence[str], layers: Sequence[int]) -> pl.DataFrame:
    """JS divergence and hot-set Jaccard for every domain pair per layer; ``domain_counts (D, L, E)``."""
    p = distributions(domain_counts)
    hot = hot_set(domain_counts)
    rows = []
    for a, b in combinations(range(len(domains)), 2):
        js = js_divergence(p[a], p[b])
        inter = (hot[a] & hot[b]).sum(axis=-1)
        union = (hot[a] | hot[b]).sum(axis=-1)
        for li, layer in enumerate(layers):
            rows.append(dict(layer=layer, domain_a=domains[a], domain_b=domains[b], js=float(js[li]),
                             jaccard=float(inter[li] / union[li]) if union[li] else float("nan")))
    return pl.DataFrame(rows, schema={"layer": pl.Int16, "domain_a": pl.String, "domain_b": pl.String,
                                      "js": pl.Float64, "jaccard": pl.Float64})


def lift(domain_counts: np.ndarray) -> np.ndarray:
    """``(D, L, E)`` lift p(d,l,e) / p(l,e); NaN where the expert has no load overall."""
    p_d = distributions(domain_counts)
    p_all = distributions(domain_counts.sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p_all[None] > 0, p_d / p_all[None], np.nan)


def domain_experts(domain_counts: np.ndarray, domains: Sequence[str], layers: Sequence[int]) -> pl.DataFrame:
    """One row per (domain, layer, expert): count, share of the domain's layer load, lift, specialist flag."""
    D, L, E = domain_counts.shape
    lf = lift(domain_counts)
    share = distributions(domain_counts)
    return pl.DataFrame(
        {
            "domain": np.repeat(np.asarray(domains, dtype=object), L * E).tolist(),
            "layer": pl.Series(np.tile(np.repeat(np.asarray(layers), E), D), dtype=pl.Int16),
            "expert": pl.Series(np.tile(np.arange(E), D * L), dtype=pl.Int16),
            "count": domain_counts.ravel().astype(np.int64),
            "share": share.ravel(),
            "lift": lf.ravel(),
            "specialist": np.nan_to_num(lf.ravel(), nan=0.0) > SPECIALIST_LIFT,
        }
    )


def split_requests(request_domain: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded held-out split by request, stratified by domain: (train indices, test indices).

    A domain with fewer than 2 requests contributes none (it cannot be both learnt and tested).
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for d in np.unique(request_domain[request_domain >= 0]):
        members = rng.permutation(np.flatnonzero(request_domain == d))
        if members.size < 2:
            continue
        n_test = min(members.size - 1, max(1, int(round(test_fraction * members.size))))
        test.append(members[:n_test])
        train.append(members[n_test:])
    cat = lambda xs: np.sort(np.concatenate(xs)) if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(train), cat(test)


def features(prefill: np.ndarray) -> np.ndarray:
    """``(R, L, E)`` prefill counts -> ``(R, L, E)`` with every layer's vector L2-normalised."""
    x = np.asarray(prefill, np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def nearest_centroid(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, classes: int) -> np.ndarray:
    """Predict classes of ``test_x (n, F)`` by the nearest L2-normalised class centroid of ``train_x (m, F)``."""
    return _nearest(_class_means(lambda rows: train_x[rows], np.arange(len(train_y)), train_y, classes,
                                 train_x.shape[1]), test_x)


def _class_means(rows_of: Callable[[np.ndarray], np.ndarray], train: np.ndarray, train_y: np.ndarray,
                 classes: int, width: int) -> np.ndarray:
    """``(classes, width)`` mean of each class's training vectors ``rows_of(train rows) -> (n, width)``,
    built one class at a time (only one class's vectors are ever held)."""
    cent = np.zeros((classes, width))
    for c in range(classes):
        rows = train[train_y == c]
        if len(rows):
            cent[c] = rows_of(rows).reshape(len(rows), width).mean(axis=0)
    return cent


def _nearest(cent: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(cent, axis=1, keepdims=True)
    cent = np.divide(cent, norm, out=np.zeros_like(cent), where=norm > 0)
    tnorm = np.linalg.norm(test_x, axis=1, keepdims=True)
    tx = np.divide(test_x, tnorm, out=np.zeros_like(test_x), where=tnorm > 0)
    # For unit vectors, the nearest centroid in L2 is the one of largest dot product.
    scores = tx @ cent.T
    scores[:, norm[:, 0] == 0] = -np.inf
    return scores.argmax(axis=1)


def classify(prefill: np.ndarray, request_domain: np.ndarray, domains: Sequence[str], layers: Sequence[int],
             seed: int, test_fraction: float = 0.3) -> tuple[dict, pl.DataFrame]:
    """Accuracy of predicting each held-out request's domain from its prefill counts ``(R, L, E)``.

    Returns the summary (overall accuracy over all layers, per-domain accuracy, split sizes, chance
    level) and a per-layer frame (accuracy from that layer's counts alone). Requests without prefill
    tokens are left out. Features are computed one class (or the test set) at a time, never for every
    request at once: float64 features of (R, L, E) counts would take twice the int32 counts.
    """
    R, L, E = prefill.shape
    has_prefill = prefill.sum(axis=(1, 2)) > 0
    y = np.where(has_prefill, request_domain, -1)
    train, test = split_requests(y, test_fraction, seed)
    n_cls = len(domains)
    test_x = features(prefill[test])  # (n_test, L, E)
    cent = _class_means(lambda rows: features(prefill[rows]), train, y[train], n_cls, L * E)
    pred = _nearest(cent, test_x.reshape(len(test), -1))
    correct = pred == y[test]
    per_domain = {
        domains[c]: float(correct[y[test] == c].mean()) for c in range(n_cls) if (y[test] == c).any()
    }
    per_layer = []
    # A layer's features are its slice of the whole features (normalised per layer), and a class mean
    # adds its rows in the same order whatever the width: the layer's centroids are the whole centroids'
    # slice, the same floats as computing them again from the counts of that layer (a second pass, halved).
    by_layer = cent.reshape(n_cls, L, E)
    for li, layer in enumerate(layers):
        p = _nearest(by_layer[:, li], test_x[:, li])
        per_layer.append(dict(layer=layer, accuracy=float((p == y[test]).mean())))
    counts = np.bincount(y[train], minlength=n_cls)
    summary = dict(
        accuracy=float(correct.mean()),
        per_domain=per_domain,
        train_requests=int(len(train)),
        test_requests=int(len(test)),
        test_fraction=test_fraction,
        chance=float(counts.max() / counts.sum()) if counts.sum() else None,
        method="nearest L2-normalised centroid of per-layer L2-normalised prefill counts",
    )
    return summary, pl.DataFrame(per_layer, schema={"layer": pl.Int16, "accuracy": pl.Float64})
