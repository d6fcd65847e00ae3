"""The pass's hashes (splitmix64, token identity), computed in place, against the plain formulas."""

from __future__ import annotations

import numpy as np

from moeprof.analysis.aggregate import _token_key, splitmix64


def plain_splitmix64(x):
    z = np.asarray(x).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def test_splitmix64_matches_the_formula_and_leaves_its_input_alone():
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 10_000):
        x = rng.integers(-(1 << 62), 1 << 62, n)
        kept = x.copy()
        np.testing.assert_array_equal(splitmix64(x), plain_splitmix64(x))
        np.testing.assert_array_equal(x, kept)
        u = x.astype(np.uint64)
        np.testing.assert_array_equal(splitmix64(u, copy=False), plain_splitmix64(kept))
        np.testing.assert_array_equal(u, plain_splitmix64(kept))  # copy=False: hashed in place
    assert int(splitmix64(np.array([0], np.uint64))[0]) == 0xE220A8397B1DCDAF  # splitmix64's first output from seed 0


def test_token_key_matches_the_formula_with_negative_and_large_fields():
    rng = np.random.default_rng(4)
    rid = rng.integers(-5, 1 << 40, 5000)
    step = rng.integers(-3, 1 << 31, 5000).astype(np.int32)
    pos = rng.integers(-(1 << 31), 1 << 31, 5000).astype(np.int32)
    with np.errstate(over="ignore"):
        want = plain_splitmix64((rid.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
                                ^ ((step.astype(np.uint64) << np.uint64(32)) | pos.astype(np.uint32).astype(np.uint64)))
    np.testing.assert_array_equal(_token_key(rid, step, pos), want)
