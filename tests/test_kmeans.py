"""K-means of request signatures as mergeable rounds (moeprof.placement.kmeans) and held-out scoring in
blocks (moeprof.placement.simulate): against a plain numpy Lloyd written here, against the scipy
``kmeans2`` call moeprof made before, and the same bit for bit whatever runs the blocks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from moeprof.analysis.engine import LocalEngine
from moeprof.placement import kmeans as km
from moeprof.placement import simulate as sm
from moeprof.placement.data import load_routing, signatures, split_requests
from moeprof.placement.grouping import fit_grouping
from moeprof.placement.run import compare
from moeprof.trace.reader import Trace

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "trace"


def lloyd(x: np.ndarray, k: int, seed: int, iters: int = 30) -> tuple[np.ndarray, np.ndarray, float]:
    """Textbook K-means: k-means++ seeding (first row by index, then one uniform per centroid, rows
    drawn in proportion to squared distance), then Lloyd rounds until the labels repeat; an empty
    cluster keeps its centroid. All rows at once, plain numpy."""
    x = x.astype(np.float64)
    rng = np.random.default_rng(seed)
    c = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min([((x - ci) ** 2).sum(1) for ci in c], axis=0)
        u = rng.uniform()
        c.append(x[np.searchsorted(np.cumsum(d2 / d2.sum()), u)] if d2.sum() > 0 else x[0])
    c = np.array(c)
    labels = None
    for _ in range(iters):
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        new = d.argmin(1)
        inertia = d[np.arange(len(x)), new].sum()
        for j in range(k):
            if (new == j).any():
                c[j] = x[new == j].mean(0)
        if labels is not None and (labels == new).all():
            break
        labels = new
    return c, new, inertia


def blobs(n: int, dim: int, k: int, seed: int) -> np.ndarray:
    """Unit rows around ``k`` random directions (what request signatures look like)."""
    rng = np.random.default_rng(seed)
    centres = rng.random((k, dim)) ** 4
    x = centres[rng.integers(k, size=n)] + 0.15 * rng.random((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_known_answer_two_pairs(monkeypatch):
    """Two pairs of points far apart, one block per row: each pair is a cluster, centred on its middle,
    inertia 4 × 0.5² (for these seeds k-means++ draws the second centre from the far pair, as it does
    with probability 201/202)."""
    monkeypatch.setattr(km, "BLOCK_BYTES", 8 * 2)
    x = np.array([[0, 0], [0, 1], [10, 0], [10, 1]], dtype=np.float32)
    for seed in range(5):
        fit = km.fit_kmeans(x, 2, seed)
        assert fit.blocks == 4
        assert fit.labels[0] == fit.labels[1] != fit.labels[2] == fit.labels[3]
        assert sorted(map(tuple, fit.centroids.tolist())) == [(0.0, 0.5), (10.0, 0.5)]
        assert fit.inertia == 1.0


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 13 rows of a 40-wide signature (so a few hundred rows make many tasks)."""
    monkeypatch.setattr(km, "BLOCK_BYTES", 8 * 40 * 13)


@pytest.mark.parametrize("k,seed", [(2, 0), (4, 1), (8, 5)])
def test_rounds_match_plain_lloyd(small_blocks, k, seed):
    x = blobs(300, 40, 5, seed)
    fit = km.fit_kmeans(x, k, seed)
    assert fit.blocks == 24  # 300 rows / 13 per block
    c, labels, inertia = lloyd(x, k, seed)
    assert np.array_equal(fit.labels, labels)
    np.testing.assert_allclose(fit.centroids, c, rtol=0, atol=1e-12)
    assert fit.inertia == pytest.approx(inertia, rel=1e-9)
    assert 1 <= fit.rounds <= 30


def test_same_bits_whatever_runs_the_blocks(small_blocks):
    x = blobs(300, 40, 5, 2)
    here = km.fit_kmeans(x, 6, 3)
    for engine in (LocalEngine(1), LocalEngine(4)):
        other = km.fit_kmeans(x, 6, 3, engine=engine)
        assert np.array_equal(here.labels, other.labels)
        assert here.centroids.tobytes() == other.centroids.tobytes()
        assert here.inertia == other.inertia


def test_block_size_does_not_change_the_labels(small_blocks, monkeypatch):
    x = blobs(300, 40, 5, 4)
    many = km.fit_kmeans(x, 5, 0)
    monkeypatch.setattr(km, "BLOCK_BYTES", 1 << 30)
    one = km.fit_kmeans(x, 5, 0)
    assert (many.blocks, one.blocks) == (24, 1)
    assert np.array_equal(many.labels, one.labels)
    np.testing.assert_allclose(many.centroids, one.centroids, rtol=0, atol=1e-12)  # only the order of additions


def _kmeans2(x: np.ndarray, k: int, seed: int):
    from scipy.cluster.vq import kmeans2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kmeans2(x.astype(np.float64), k, iter=30, minit="++", seed=np.random.default_rng(seed),
                       missing="warn", check_finite=False)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_same_labels_as_scipy_kmeans2_on_the_sample_trace(phase):
    """The published placements were fitted with kmeans2: the rounds give the same labels (and here,
    in one block, the same centroids), so no figure moved."""
    data = load_routing(Trace.open(SAMPLE))
    for seed in (0, 3):
        x = signatures(data.counts(phase)[~split_requests(data.num_requests, 0.3, seed)])
        for k in (2, 4, 8):
            c, labels = _kmeans2(x, k, seed)
            fit = km.fit_kmeans(x, k, seed)
            assert np.array_equal(fit.labels, labels), (seed, k)
            assert np.array_equal(fit.centroids, c), (seed, k)


def test_fewer_distinct_rows_than_clusters():
    """Seeding runs out of distinct rows: the extra centroids repeat row 0, their clusters stay empty
    and keep their centroid; no NaN, no warning, and the same as kmeans2 and the plain Lloyd."""
    x = np.repeat(np.eye(3, 6, dtype=np.float32), 4, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = km.fit_kmeans(x, 5, 0)
    assert set(fit.labels.tolist()) == {0, 1, 2} and np.isfinite(fit.centroids).all()
    c, labels = _kmeans2(x, 5, 0)
    assert np.array_equal(fit.labels, labels) and np.array_equal(fit.centroids, c)
    assert np.array_equal(lloyd(x, 5, 0)[1], fit.labels)
    assert np.array_equal(fit.centroids[3], x[0]) and np.array_equal(fit.centroids[4], x[0])


def test_prefill_grouping_on_an_engine_is_the_same(small_blocks):
    x = blobs(200, 40, 4, 9)
    a = fit_grouping("prefill", nodes=4, seed=1, train_domains=np.array(["d"] * 200), train_prefill_sig=x,
                     train_node=None)
    b = fit_grouping("prefill", nodes=4, seed=1, train_domains=np.array(["d"] * 200), train_prefill_sig=x,
                     train_node=None, engine=LocalEngine(2))
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())


def test_scoring_in_blocks_is_the_same(monkeypatch):
    """compare() with an engine (many K-means and scoring blocks, threads) gives the local table."""
    def rows(cmp):
        return json.dumps([dict(r, fit_seconds=None, info=dict(r["info"], fit_seconds=None))
                           for r in cmp.to_dict()["rows"]])

    one = compare(SAMPLE, nodes=2, gpus_per_node=4, redundant=8)
    monkeypatch.setattr(km, "BLOCK_BYTES", 8 * 128 * 17)  # the sample's 4 x 32 signatures: 17 rows a block
    monkeypatch.setattr(sm, "SCORE_BLOCK_ROWS", 999)
    blocks = compare(SAMPLE, nodes=2, gpus_per_node=4, redundant=8, engine=LocalEngine(2))
    assert rows(one) == rows(blocks)
    for key, p in one.placements.items():
        assert json.dumps(p.grouping.to_dict()) == json.dumps(blocks.placements[key].grouping.to_dict()), key
