"""K-means of request signatures as mergeable rounds: blocks of rows go to engine tasks, the driver merges.

The grouping model (:mod:`moeprof.placement.grouping`) and the ``kmeans`` policy cluster one signature
per request. With many requests the rows do not fit one process's time budget, so every pass over the
rows runs per block (a fixed number of rows, set by the signature width alone, never by the engine):

* k-means++ seeding: for the ``i``-th centroid each task returns its rows' squared distance to the
  nearest of the centroids so far; the driver joins them in block order (one float per request) and
  draws the next centroid's row as k-means++ does.
* Lloyd round: each task labels its rows with the nearest centroid and returns per-cluster sums
  (float64, rows added in order), member counts and its inertia; the driver adds the blocks' partials
  in block order and divides. A cluster left without members keeps its centroid (deterministic).

The draws are those of scipy's ``kmeans2(minit="++", missing="warn")`` (an index from
``rng.integers``, then one ``rng.uniform()`` per further centroid), distances come from scipy
(``cdist``, ``vq``), and rounds stop when the labels repeat, from where every further round would
return the same centroids and labels. So the labels equal those of the ``kmeans2`` call moeprof made
before, and the centroids differ from its only by the order of float64 additions. Whatever the
engine (none, local threads or Ray tasks), the blocks and the order of every addition are the same,
so labels and centroids are bit for bit the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from moeprof.errors import PlacementError

BLOCK_BYTES = 32 << 20
"""Size of one block of signatures as float64 (32 MiB: 282 requests of DeepSeek-V3's 58 × 256
signature, 32,768 of the sample trace's 4 × 32): a task's share of one round, 10-25 ms of work,
above the few ms a Ray task costs (``bench/placement_bench.py --kmeans-requests``)."""


@dataclass
class KMeansFit:
    centroids: np.ndarray  # [k, D] float64
    labels: np.ndarray  # [R] int32, against the centroids of the last round's start
    inertia: float  # sum of squared distances of the rows to their centroid in the last round
    rounds: int  # Lloyd rounds run (at most ``iters``)
    blocks: int


def block_rows(dim: int) -> int:
    """Rows per block for signatures of width ``dim`` (at least one)."""
    return max(1, BLOCK_BYTES // max(1, 8 * dim))


def fit_kmeans(x: np.ndarray, k: int, seed: int, iters: int = 30, engine: Any = None) -> KMeansFit:
    """Seeded K-means (k-means++ start, at most ``iters`` Lloyd rounds) of the rows of ``x``.

    ``engine`` (:mod:`moeprof.analysis.engine`) runs the blocks' tasks; None runs them here, in order.
    ``k`` is capped at the number of rows (not of distinct rows: duplicate rows can leave a cluster
    empty, and ``labels`` may then use fewer than ``k`` ids; callers count ``labels.max() + 1``).
    """
    n = len(x)
    if n == 0:
        raise PlacementError("no requests to cluster")
    k = max(1, min(k, n))
    step = block_rows(x.shape[1])
    blocks = [(f"kmeans-block-{i:05d}", x[a:a + step]) for i, a in enumerate(range(0, n, step))]
    run = _runner(engine, blocks)

    rng = np.random.default_rng(seed)
    # scipy's _kpp draws, in the same order: the first row by index, then one uniform per centroid
    first = int(rng.integers(n, size=None, dtype="int64", endpoint=False))
    centroids = np.empty((k, x.shape[1]), dtype=np.float64)
    centroids[0] = x[first]
    for i in range(1, k):
        d2 = np.concatenate(run(_seed_distances, centroids[:i]))
        total, u = d2.sum(), rng.uniform()
        # every row on a centroid already (fewer distinct rows than k): row 0 again, as kmeans2's
        # all-NaN probabilities gave; the cluster ends up empty and keeps that centroid
        centroids[i] = x[int(np.searchsorted((d2 / total).cumsum(), u)) if total > 0 else 0]

    labels = None
    rounds = 0
    inertia = 0.0
    for rounds in range(1, max(1, iters) + 1):
        parts = run(_lloyd_partial, centroids)
        new_labels = np.concatenate([p[0] for p in parts])
        sums, counts, inertia = parts[0][1].copy(), parts[0][2].copy(), parts[0][3]
        for _, s, c, e in parts[1:]:  # block order: the same additions whatever ran the blocks
            sums += s
            counts += c
            inertia += e
        has = counts > 0
        updated = centroids.copy()  # a cluster without members keeps its centroid
        updated[has] = sums[has] / counts[has, None]
        centroids = updated
        done = labels is not None and np.array_equal(labels, new_labels)
        labels = new_labels
        if done:  # same labels, so the same means: every further round repeats this one
            break
    return KMeansFit(centroids, labels, float(inertia), rounds, len(blocks))


def _runner(engine: Any, blocks: list[tuple[str, np.ndarray]]) -> Callable[[Callable, Any], Sequence[Any]]:
    """``run(fn, shared)``: ``fn(block, shared)`` for every block, results in block order."""
    if engine is None:
        return lambda fn, shared: [fn(b, shared) for b in blocks]
    items = [engine.put(b) for b in blocks]  # on Ray: stored once, read by every round's tasks
    return lambda fn, shared: engine.map(fn, items, shared)


def _seed_distances(block: tuple[str, np.ndarray], centroids: np.ndarray) -> np.ndarray:
    """``[rows]`` squared distance of each row of the block to its nearest centroid so far."""
    from scipy.spatial.distance import cdist  # here: scipy's import is slow, and only K-means needs it

    return cdist(centroids, block[1].astype(np.float64), metric="sqeuclidean").min(axis=0)


def _lloyd_partial(block: tuple[str, np.ndarray], centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One block's share of a Lloyd round: ``(labels, sums[k, D], counts[k], inertia)``."""
    from scipy.cluster.vq import vq

    rows = block[1].astype(np.float64)
    labels, dist = vq(rows, centroids, check_finite=False)
    sums = np.zeros_like(centroids)
    counts = np.bincount(labels, minlength=len(centroids)).astype(np.int64)
    for c in np.flatnonzero(counts):
        # a sum down the rows adds them in row order (as kmeans2 did), and is 4-8x faster than np.add.at
        sums[c] = rows[labels == c].sum(axis=0)
    return labels.astype(np.int32), sums, counts, float(np.square(dist).sum())
