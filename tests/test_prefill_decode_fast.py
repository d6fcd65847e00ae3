"""The fast prefill -> decode statistics against plain references (issue 18: analyze near the scan floor).

``unit_ranks`` must give the very floats of ``_unit(average_ranks(...))`` (analyze's outputs are
byte-identical to before), ``correlations`` the numbers of a per-request loop over scipy's ranks and
Python sets, whatever its threads and whether the requests are given as rows of a larger array.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata

from moeprof.analysis import domain as dom
from moeprof.analysis import phase as ph


def _plain_unit(a: np.ndarray) -> np.ndarray:
    """The unit vectors as analyze computed them before (centre, scale, then float32)."""
    a = np.asarray(a, np.float64)
    c = a - a.mean(axis=-1, keepdims=True)
    norm = np.sqrt((c * c).sum(axis=-1, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (c / np.where(norm > 0, norm, np.nan)).astype(np.float32)


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    skewed = rng.poisson(rng.dirichlet(np.full(256, 0.3), size=(6, 5)) * 300)
    return [
        rng.integers(0, 4, size=(5, 3, 16)),  # many ties
        np.zeros((3, 2, 8), np.int32),  # no load at all: every rank tied, no correlation (NaN)
        np.full((2, 7), 5),  # constant rows
        rng.integers(0, 2, size=(4, 1)),  # one expert
        rng.integers(0, 1 << 20, size=(3, 4, 32)),  # large counts, few ties
        skewed.astype(np.int32),  # DeepSeek-V3 width, expert-like skew
        rng.random((3, 9)),  # floats
        np.array([[3, 3, 1, 1, 1, 0, 7, 7]]),
    ]


@pytest.mark.parametrize("a", _cases(), ids=lambda a: f"{a.dtype}{a.shape}")
def test_ranks_and_unit_ranks_are_the_plain_ones_bit_for_bit(a):
    assert np.array_equal(ph.average_ranks(a), rankdata(-a, axis=-1).astype(np.float32))
    want = _plain_unit(rankdata(-a, axis=-1).astype(np.float32))
    got = ph.unit_ranks(a)
    assert got.dtype == np.float32 and got.shape == a.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # the same bits, NaNs included
    assert np.array_equal(ph._unit(a).view(np.uint32), _plain_unit(a).view(np.uint32))


def test_ranks_of_nothing():
    a = np.zeros((0, 3, 8), np.int32)
    assert ph.average_ranks(a).shape == a.shape and ph.unit_ranks(a).shape == a.shape
    assert ph.average_ranks(np.zeros((4, 0))).shape == (4, 0)


def _plain_correlations(x, y, request_domain, ms, seed):
    """Per-layer means of a per-request loop: Pearson, Spearman (scipy's average ranks), controls, recall."""
    R, L, E = x.shape

    def pearson(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.std() == 0 or b.std() == 0:
            return np.nan
        return float(np.corrcoef(a, b)[0, 1])

    def spearman(a, b):
        return pearson(rankdata(-a), rankdata(-b))

    def top(a, m):
        return set(np.argsort(-a, kind="stable")[:m].tolist())

    partners = {name: ph.control_partners(request_domain, same, seed + (0 if same else 1))
                for name, same in (("same_domain", True), ("other_domain", False))}
    cols = {k: [] for k in ["pearson", "spearman", "requests", "same_domain_pearson", "same_domain_spearman",
                            "other_domain_pearson", "other_domain_spearman"] + [f"recall_at_{m}" for m in ms]}

    def mean(v):
        v = [u for u in v if np.isfinite(u)]
        return float(np.mean(v)) if v else np.nan

    for li in range(L):
        p = [pearson(x[r, li], y[r, li]) for r in range(R)]
        cols["pearson"].append(mean(p))
        cols["spearman"].append(mean([spearman(x[r, li], y[r, li]) for r in range(R)]))
        cols["requests"].append(sum(np.isfinite(u) for u in p))
        for name, partner in partners.items():
            cols[f"{name}_pearson"].append(mean([pearson(x[r, li], y[partner[r], li]) for r in range(R) if partner[r] >= 0]))
            cols[f"{name}_spearman"].append(mean([spearman(x[r, li], y[partner[r], li]) for r in range(R) if partner[r] >= 0]))
        for m in ms:
            cols[f"recall_at_{m}"].append(mean([
                len(top(x[r, li], m) & top(y[r, li], m)) / m if x[r, li].sum() and y[r, li].sum() else np.nan
                for r in range(R)]))
    return cols


def _counts(rng, R, L, E, scale):
    p = rng.dirichlet(np.full(E, 0.4), size=(R, L))
    return rng.poisson(p * scale).astype(np.int32), rng.poisson(p * scale / 3).astype(np.int32)


@pytest.mark.parametrize("R,L,E", [(1, 2, 8), (3, 2, 16), (40, 3, 32), (300, 2, 64)])
def test_correlations_match_a_plain_loop(R, L, E):
    rng = np.random.default_rng(R)
    x, y = _counts(rng, R, L, E, 60)
    if R > 2:
        y[1, 0] = 0  # a request-layer with no decode load: no correlation, no recall
        x[2, 1] = 4  # a constant prefill vector
    req_dom = rng.integers(0, 3, R).astype(np.int32)
    ms = [2, 4]
    per_layer, per_request = ph.correlations(x, y, req_dom, list(range(L)), ms, seed=1)
    want = _plain_correlations(x, y, req_dom, ms, 1)
    for name, values in want.items():
        assert np.allclose(per_layer[name].to_numpy().astype(float), values, atol=1e-6, equal_nan=True), name
    assert per_request.height == R * L


def test_correlations_do_not_depend_on_threads_or_rows():
    rng = np.random.default_rng(3)
    S, L, E = 700, 3, 64  # several blocks of 128 requests
    counts = np.stack(_counts(rng, S, L, E, 80), axis=1)  # (S, 2, L, E), as analyze keeps them
    rows = np.sort(rng.choice(S, 450, replace=False))
    req_dom = rng.integers(0, 4, rows.size).astype(np.int32)
    want = ph.correlations(counts[rows, 0], counts[rows, 1], req_dom, list(range(L)), [3, 7], 0, threads=1)
    for threads in (1, 2, 5):
        got = ph.correlations(counts[:, 0], counts[:, 1], req_dom, list(range(L)), [3, 7], 0, threads=threads, rows=rows)
        assert all(g.equals(w) for g, w in zip(got, want))


def test_recall_by_places_is_the_comparison_of_top_sets():
    rng = np.random.default_rng(11)
    x, y = rng.integers(0, 5, size=(2, 50, 3, 20))  # ties, broken by lower expert id
    x[0, 0] = 0
    empty = ph._empty(x) | ph._empty(y)
    got = ph._recalls(ph.order_desc(x)[..., :6], ph.order_desc(y)[..., :6], empty, [1, 3, 6])
    for m in (1, 3, 6):
        assert np.array_equal(got[m], ph.recall_at(x, y, m), equal_nan=True)
        plain = [[len(set(np.argsort(-x[r, li], kind="stable")[:m]) & set(np.argsort(-y[r, li], kind="stable")[:m])) / m
                  for li in range(3)] for r in range(50)]
        assert np.array_equal(got[m], np.where(empty, np.nan, plain), equal_nan=True)


def test_classification_per_layer_is_that_of_each_layer_alone():
    rng = np.random.default_rng(5)
    R, L, E = 60, 4, 16
    prefill = rng.poisson(rng.dirichlet(np.full(E, 0.5), size=(R, L)) * 40).astype(np.int32)
    prefill[3] = 0  # a request without prefill is left out
    y = rng.integers(0, 3, R).astype(np.int32)
    summary, per_layer = dom.classify(prefill, y.copy(), ["a", "b", "c"], [10, 11, 12, 13], seed=2)
    has = prefill.sum(axis=(1, 2)) > 0
    yy = np.where(has, y, -1)
    train, test = dom.split_requests(yy, 0.3, 2)
    for li in range(L):
        feats = dom.features(prefill[:, li])
        pred = dom.nearest_centroid(feats[train], yy[train], feats[test], 3)
        assert per_layer["accuracy"][li] == float((pred == yy[test]).mean())
