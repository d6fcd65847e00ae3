"""Co-activation counts (moeprof.analysis.coactivation.counts) against a plain loop over tokens."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pytest

from moeprof.analysis import coactivation as co


def plain(tokens: np.ndarray, steps: list[tuple[int, int]], E: int) -> tuple[np.ndarray, ...]:
    """Loads, pairs and transitions token by token, as the definitions in coactivation's docstring read."""
    T, L, k = tokens.shape
    loads = np.zeros((L, E), np.int64)
    pairs = np.zeros((L, E, E), np.int64)
    trans = np.zeros((len(steps), E, E), np.int64)
    for t in range(T):
        for li in range(L):
            row = tokens[t, li]
            for e in row[row >= 0]:
                loads[li, e] += 1
            if (row >= 0).all():  # pairs: tokens with every slot of the layer set
                for c1 in range(k):
                    for c2 in range(c1 + 1, k):
                        pairs[li, row[c1], row[c2]] += 1
                        pairs[li, row[c2], row[c1]] += 1
        for p, (i, j) in enumerate(steps):
            a, b = tokens[t, i], tokens[t, j]
            if (a >= 0).all() and (b >= 0).all():
                for x in a:
                    for y in b:
                        trans[p, x, y] += 1
    return loads, pairs, trans


def random_tokens(rng: np.random.Generator, T: int, L: int, k: int, E: int, absent: float = 0.0,
                  duplicates: bool = False) -> np.ndarray:
    if duplicates:  # experts drawn with replacement: a token may pick one expert twice in a layer
        tok = rng.integers(0, E, size=(T, L, k))
    else:
        tok = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :k]
    tok = tok.astype(np.int16)
    if absent:
        tok[rng.random((T, L)) < absent] = -1  # a layer the token lacks
        tok[rng.random((T, L, k)) < absent / 2] = -1  # a slot left unset (a partial row)
    return tok


CASES = [
    # T, L, k, E, absent, duplicates
    (200, 5, 3, 12, 0.0, False),
    (150, 4, 2, 6, 0.2, False),
    (120, 3, 4, 5, 0.0, True),  # the same expert twice in a row
    (90, 6, 3, 8, 0.3, True),
    (50, 2, 1, 1, 0.0, False),  # one expert, top-1
    (60, 3, 1, 4, 0.1, False),  # top-1: no pairs at all
    (0, 4, 2, 8, 0.0, False),  # an empty sample
    (40, 1, 3, 7, 0.0, False),  # one layer: nothing for a second thread
    (80, 3, 8, 256, 0.1, True),  # E = 256: pair ids fill uint16 exactly (an absent -1 wraps, masked)
    (60, 3, 4, 300, 0.1, False),  # E * E > 2^16: intp ids
]


@pytest.mark.parametrize("T,L,k,E,absent,duplicates", CASES)
@pytest.mark.parametrize("threads", [0, 2])
def test_counts_equal_plain_loop(T, L, k, E, absent, duplicates, threads):
    rng = np.random.default_rng(T * 31 + L * 7 + k + E)
    tokens = random_tokens(rng, T, L, k, E, absent, duplicates)
    steps = [(i, i + 1) for i in range(L - 1)] + ([(0, L - 1)] if L > 2 else [])  # a step that skips layers
    want = plain(tokens, steps, E)
    if threads:
        with ThreadPoolExecutor(threads) as pool:
            got = co.counts(tokens, steps, E, pool)
    else:
        got = co.counts(tokens, steps, E)
    for name, g, w in zip(("loads", "pairs", "transitions"), got, want):
        assert g.dtype == np.int64, name
        assert g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)


def test_counts_of_many_tokens_in_blocks_of_slots_and_any_layout():
    """Enough tokens that transitions are counted a few slots at a time with a shorter last block (3 + 3 + 2 of k = 8
    at T = 20,000), and the same tokens laid out so that a layer's k ids are not contiguous."""
    rng = np.random.default_rng(11)
    T, L, k, E = 20_000, 3, 8, 32
    tokens = random_tokens(rng, T, L, k, E, duplicates=True)
    steps = [(0, 1), (1, 2)]
    want = np.zeros((len(steps), E, E), np.int64)
    for p, (i, j) in enumerate(steps):
        for s1 in range(k):
            for s2 in range(k):
                np.add.at(want[p], (tokens[:, i, s1], tokens[:, j, s2]), 1)
    for layout in (tokens, np.asfortranarray(tokens), tokens[::-1][::-1]):
        loads, pairs, trans = co.counts(layout, steps, E)
        np.testing.assert_array_equal(trans, want)
        np.testing.assert_array_equal(loads, [np.bincount(tokens[:, li].ravel(), minlength=E) for li in range(L)])
        assert pairs.sum() == T * L * k * (k - 1)


def test_counts_when_the_pools_thread_is_busy_until_the_caller_is_done():
    """The pool's thread takes layers only once free: here it is busy until the calling thread has counted
    every layer; its share, never started, is cancelled (not waited for: a busy pool thread may be waiting on
    this very count), and the counts are whole."""
    import threading

    rng = np.random.default_rng(3)
    tokens = random_tokens(rng, 300, 9, 3, 12, absent=0.1)
    steps = [(i, i + 1) for i in range(8)]
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(release.wait, 30)
        try:
            got = co.counts(tokens, steps, 12, pool)
            assert not busy.done()  # returned while the pool's only thread was still busy
        finally:
            release.set()
    for g, w in zip(got, plain(tokens, steps, 12)):
        np.testing.assert_array_equal(g, w)


def test_single_count_functions_match_counts():
    rng = np.random.default_rng(5)
    tokens = random_tokens(rng, 300, 6, 4, 16, absent=0.1)
    steps = co.consecutive_pairs([3, 4, 5, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9])  # 5 -> 7 is not a step: 6 is not selected
    assert steps == [(0, 1), (1, 2), (3, 4), (4, 5)]
    loads, pairs, trans = co.counts(tokens, steps, 16)
    np.testing.assert_array_equal(co.layer_counts(tokens, 16), loads)
    np.testing.assert_array_equal(co.pair_counts(tokens, 16), pairs)
    np.testing.assert_array_equal(co.transition_counts(tokens, steps, 16), trans)
    # distinct experts per row, every slot set where the layer is: zero diagonal, symmetric
    assert (pairs == pairs.transpose(0, 2, 1)).all()
    full = random_tokens(rng, 100, 3, 4, 16)
    assert not np.einsum("lii->li", co.pair_counts(full, 16)).any()


def test_no_steps_gives_an_empty_transition_array():
    tokens = random_tokens(np.random.default_rng(1), 20, 3, 2, 4)
    loads, pairs, trans = co.counts(tokens, [], 4)
    assert trans.shape == (0, 4, 4)
    assert loads.sum() == 20 * 3 * 2


@pytest.mark.parametrize("n,min_count", [(1, 1), (3, 1), (10, 2), (40, 1)])
def test_top_by_lift_is_the_full_table_filtered_and_sorted(n, min_count):
    """Chosen layer by layer, the top pairs are those of the whole pair table, ties with the n-th included
    (small integer counts: many pairs share a lift, across layers too)."""
    rng = np.random.default_rng(n * 10 + min_count)
    layers = [4, 5, 7]
    for _ in range(30):
        pairs = rng.integers(0, 4, (3, 6, 6))
        pairs = pairs + pairs.transpose(0, 2, 1)
        for layer in pairs:
            np.fill_diagonal(layer, 0)
        loads = pairs.sum(axis=2) + rng.integers(0, 2, (3, 6))
        tokens = np.full(3, 20)
        full = co.pair_table(pairs, loads, tokens, layers)
        want = full.filter(pl.col("count") >= min_count).sort("lift", descending=True, maintain_order=True).head(n)
        assert co.top_by_lift(pairs, loads, tokens, layers, n=n, min_count=min_count).equals(want)
