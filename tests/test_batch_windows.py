"""Batch imbalance reuses one size's window counts for the next size and reduces each few windows' counts
to their straggler factor as they are counted: the straggler factors it bootstraps must be those of windows
counted from the tokens directly."""

from __future__ import annotations

import numpy as np
import pytest

from moeprof.analysis import load


@pytest.mark.parametrize("sizes,T", [((1, 8, 64, 512, 4096), 17000), ((64, 512), 33 * 512 + 5), ((2, 6, 4, 8), 3000),
                                     ((3, 9, 27), 2000), ((512, 64), 20000), ((8,), 100), ((4, 8, 16), 300 * 16)])
def test_straggler_inputs_are_the_direct_window_counts(monkeypatch, sizes, T):
    rng = np.random.default_rng(T)
    L, k, E = 3, 2, 16
    tokens = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :k].astype(np.int16)
    tokens[rng.random((T, L)) < 0.05] = -1  # some tokens lack a layer
    seen = []
    real = load._bootstraps
    monkeypatch.setattr(load, "_bootstraps", lambda r, *a: seen.append(np.array(r)) or real(r, *a))
    pooled, _ = load.batch_imbalance(tokens, sizes, E, list(range(L)), seed=0)
    assert len(seen) == sum(1 for B in sizes if T // B)
    for B, r in zip([B for B in sizes if T // B], seen):
        want = load.straggler(load.batch_counts(tokens, B, E))  # no finer counts: straight from the tokens
        assert r.shape == want.shape and r.shape[0] == min(load.MAX_BATCHES, T // B)
        np.testing.assert_array_equal(r, want)
    assert pooled["batches"].to_list() == [min(load.MAX_BATCHES, T // B) for B in sizes]


def window_tokens(T: int, L: int, E: int, k: int, absent: float, repeated: int = 0) -> np.ndarray:
    """``(T, L, k)`` int16: k distinct experts per token and layer (seeded by T + L); the first ``repeated``
    tokens pick one expert k times in layer 1 (so a window's max count repeats); a share ``absent`` of the
    (token, layer) cells lack the layer (-1)."""
    rng = np.random.default_rng(T + L)
    tokens = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :k].astype(np.int16)
    if repeated:
        tokens[:repeated, 1] = tokens[:repeated, 1, :1]
    if absent:
        tokens[rng.random((T, L)) < absent] = -1
    return tokens


def plain_counts(tokens: np.ndarray, B: int, E: int, max_batches: int) -> np.ndarray:
    """Counts per window of B consecutive tokens, slot by slot (-1: a layer the token lacks)."""
    T, L, k = tokens.shape
    nb = min(max_batches, T // B)
    out = np.zeros((nb, L, E), np.int64)
    for w in range(nb):
        for t in range(w * B, (w + 1) * B):
            for li in range(L):
                for e in tokens[t, li]:
                    if e >= 0:
                        out[w, li, e] += 1
    return out


@pytest.mark.parametrize("L,E,k,B,T", [
    (3, 16, 2, 64, 5000),     # uint16 ids, several windows a call
    (58, 256, 8, 512, 1100),  # DeepSeek-V3 shape: one window a call, uint16 ids
    (58, 256, 8, 64, 700),    # uint16, fewer windows a call than intp ids would take
    (58, 256, 8, 1, 300),     # small windows: intp ids, many windows a call
    (300, 256, 2, 8, 200),    # L * E > 2^16: intp ids
])
@pytest.mark.parametrize("absent", [0.0, 0.05])
def test_window_counts_equal_a_plain_loop(L, E, k, B, T, absent):
    tokens = window_tokens(T, L, E, k, absent)
    for max_batches in (load.MAX_BATCHES, 3):
        got = load.batch_counts(tokens, B, E, max_batches=max_batches)
        np.testing.assert_array_equal(got, plain_counts(tokens, B, E, max_batches))


@pytest.mark.parametrize("L,E,k,B,T", [
    (3, 16, 2, 64, 5000),     # uint16 ids, several windows a call
    (58, 256, 8, 64, 700),    # DeepSeek-V3 shape, uint16, fewer windows a call than intp ids would take
    (58, 256, 8, 1, 300),     # small windows: intp ids, many windows a call
    (300, 256, 2, 8, 200),    # L * E > 2^16: intp ids
])
@pytest.mark.parametrize("absent", [0.0, 0.05])
def test_window_stragglers_and_coarser_counts_equal_a_plain_loop(L, E, k, B, T, absent):
    tokens = window_tokens(T, L, E, k, absent, repeated=3 * B)
    if absent:
        tokens[:B, 0] = -1  # a window with no load in a layer: NaN
    nb = T // B
    plain = plain_counts(tokens, B, E, nb)
    for m in (1, 2, 3, 8):
        nc = nb // m
        r, coarse = load.window_stragglers(tokens, B, E, nb, (m, nc))
        np.testing.assert_array_equal(r, load.straggler(plain))
        np.testing.assert_array_equal(coarse, plain_counts(tokens, m * B, E, nc))
    r, coarse = load.window_stragglers(tokens, B, E, nb)
    assert coarse is None and np.isnan(r).any() == bool(absent)
    np.testing.assert_array_equal(r, load.straggler(plain))
