"""Batch imbalance reuses one size's window counts for the next size: the counts it takes the straggler
factor of must be those of windows counted from the tokens directly."""

from __future__ import annotations

import numpy as np
import pytest

from moeprof.analysis import load


@pytest.mark.parametrize("sizes,T", [((1, 8, 64, 512, 4096), 17000), ((64, 512), 33 * 512 + 5), ((2, 6, 4, 8), 3000),
                                     ((3, 9, 27), 2000), ((512, 64), 20000), ((8,), 100)])
def test_straggler_inputs_are_the_direct_window_counts(monkeypatch, sizes, T):
    rng = np.random.default_rng(T)
    L, k, E = 3, 2, 16
    tokens = np.argsort(rng.random((T, L, E)), axis=2)[:, :, :k].astype(np.int16)
    tokens[rng.random((T, L)) < 0.05] = -1  # some tokens lack a layer
    seen = []
    real = load.straggler
    monkeypatch.setattr(load, "straggler", lambda c: seen.append(np.array(c)) or real(c))
    pooled, _ = load.batch_imbalance(tokens, sizes, E, list(range(L)), seed=0)
    assert len(seen) == sum(1 for B in sizes if T // B)
    for B, counts in zip([B for B in sizes if T // B], seen):
        want = load.batch_counts(tokens, B, E)  # no finer counts: straight from the tokens
        assert counts.shape == want.shape and counts.shape[0] == min(load.MAX_BATCHES, T // B)
        np.testing.assert_array_equal(counts, want)
    assert pooled["batches"].to_list() == [min(load.MAX_BATCHES, T // B) for B in sizes]
