"""The batch-imbalance bootstrap reads resample quantiles off sorted values: it must give exactly
what np.quantile over the resampled rows gives (the definition), for every shape, ties and NaN rows."""

import numpy as np
import pytest

from moeprof.analysis.load import _bootstrap, _bootstraps


def _by_definition(values, q, rng, reps=1000, per_column=False):
    rows = values[np.isfinite(values).all(axis=1)]
    n = rows.shape[0]
    idx = rng.integers(0, n, size=(reps, n))
    if per_column:
        point, boot = np.quantile(rows, q, axis=0), np.quantile(rows[idx], q, axis=1)
    else:
        point, boot = np.quantile(rows, q), np.quantile(rows[idx].reshape(reps, -1), q, axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975], axis=0)
    return point, lo, hi


@pytest.mark.parametrize("n,m", [(256, 58), (32, 7), (3, 5), (1, 1), (7, 1), (200, 3)])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.0, 1.0, 0.025])
@pytest.mark.parametrize("per_column", [False, True])
def test_bootstrap_equals_quantiles_of_resamples(n, m, q, per_column):
    for seed, kind in enumerate(("smooth", "ties", "nan rows", "constant", "few values", "30 values")):
        v = np.random.default_rng(seed).gamma(2.0, size=(n, m))
        if kind == "ties":
            v = np.round(v, 0)
        if kind == "constant":  # max/mean at B = 1: E / k everywhere
            v = np.full((n, m), 32.0)
        if kind == "few values":  # B = 8: max/mean = max count * E / (B k), a few values
            v = np.random.default_rng(seed).integers(1, 8, size=(n, m)) * (256 / 64)
        if kind == "30 values":  # few for the pooled quantiles, many for the per-layer ones
            v = np.random.default_rng(seed).integers(0, 30, size=(n, m)) / 7
        if kind == "nan rows" and n > 2:
            v[1, 0] = np.nan
        want = _by_definition(v, q, np.random.default_rng(seed), per_column=per_column)
        got = _bootstrap(v, q, np.random.default_rng(seed), per_column=per_column)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_bootstrap_of_no_rows_is_nan():
    v = np.full((4, 3), np.nan)
    for per_column in (False, True):
        out = _bootstrap(v, 0.5, np.random.default_rng(0), per_column=per_column)
        assert all(np.isnan(x).all() for x in out)


@pytest.mark.parametrize("n,m", [(256, 58), (33, 58), (4, 58), (300, 2)])
def test_bootstraps_share_nothing_but_sorting(n, m):
    """Several bootstraps of one array in one call: each the definition's result, with the resamples
    drawn in the order given, as separate calls would draw them (also after those of one value, read
    without their resamples)."""
    rng = np.random.default_rng(n)
    for v in (rng.gamma(2.0, size=(n, m)), rng.integers(1, 40, size=(n, m)) / 2.0, np.full((n, m), 32.0)):
        wanted = ((0.5, False), (0.9, False), (0.5, True), (0.9, True))
        got = _bootstraps(v, wanted, np.random.default_rng(7))
        ref_rng = np.random.default_rng(7)
        for (q, per_column), g in zip(wanted, got):
            want = _by_definition(v, q, ref_rng, per_column=per_column)
            for w, x in zip(want, g):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(w))


def test_bootstraps_of_one_value_draw_their_resamples():
    """Batch imbalance draws every batch size's resamples from one generator: after the bootstraps of one
    value (B = 1), those of the next size must be drawn from where the definition's would be."""
    rng = np.random.default_rng(3)
    sizes = (np.full((256, 58), 32.0), rng.integers(1, 8, size=(256, 58)) * 4.0, rng.gamma(2.0, size=(33, 58)))
    wanted = ((0.5, False), (0.9, False), (0.5, True), (0.9, True))
    got_rng, ref_rng = np.random.default_rng(0), np.random.default_rng(0)
    for v in sizes:
        got = _bootstraps(v, wanted, got_rng)
        for (q, per_column), g in zip(wanted, got):
            want = _by_definition(v, q, ref_rng, per_column=per_column)
            for w, x in zip(want, g):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(w))
