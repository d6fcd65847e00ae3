"""Load imbalance: how unevenly a layer's token-routes fall on its experts.

For a count vector ``n`` of shape ``(E,)`` (token-routes per expert of one layer over a token set):

- ``max_over_mean`` = max n / mean n, the straggler factor (1.0 = perfect balance, E/k at most);
- ``cv`` = population standard deviation / mean;
- ``gini`` in [0, 1): 0 when every expert has the same load;
- ``entropy`` = H(p) / ln E with p = n / sum n: 1.0 when uniform;
- ``dead`` = number of experts with n = 0;
- ``hot_share`` = share of the load carried by the top 10% of experts (ceil(0.1 E) of them).

Whole-trace values come from the merged counts; batch-level values from windows of B consecutive
tokens of the token sample (see :mod:`moeprof.analysis.aggregate`), summarised per batch size as
median and p90 with seeded bootstrap 95% intervals.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from moeprof.analysis.aggregate import Aggregates

METRICS = ("max_over_mean", "cv", "gini", "entropy", "dead", "hot_share")
BOOTSTRAP_REPS = 1000
MAX_BATCHES = 256


def hot_count(num_experts: int) -> int:
    """Size of the "hot" set: the top 10% of experts, at least one."""
    return max(1, math.ceil(0.1 * num_experts))


def imbalance(n: np.ndarray) -> dict[str, np.ndarray]:
    """Imbalance metrics of count vectors ``n`` of shape ``(..., E)``; each result has shape ``(...)``.

    A vector with no load gives NaN for every ratio (and ``dead`` = E).
    """
    n = np.asarray(n, dtype=np.float64)
    E = n.shape[-1]
    total = n.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / E
        p = n / total[..., None]
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        srt = np.sort(n, axis=-1)
        ranks = np.arange(1, E + 1, dtype=np.float64)
        gini = (2.0 * (srt * ranks).sum(axis=-1)) / (E * total) - (E + 1.0) / E
        out = {
            "max_over_mean": n.max(axis=-1) / mean,
            "cv": n.std(axis=-1) / mean,
            "gini": gini,
            "entropy": -plogp.sum(axis=-1) / math.log(E) if E > 1 else np.ones_like(total),
            "dead": (n == 0).sum(axis=-1).astype(np.float64),
            "hot_share": srt[..., E - hot_count(E) :].sum(axis=-1) / total,
        }
    empty = total == 0
    for key in ("max_over_mean", "cv", "gini", "entropy", "hot_share"):
        out[key] = np.where(empty, np.nan, out[key])
    return out


def layer_imbalance(agg: Aggregates, phase_known: bool) -> pl.DataFrame:
    """One row per layer: tokens and every metric over the whole selection (and max/mean per phase)."""
    layers = agg.selection.layers
    k = agg.selection.top_k
    total = agg.total()
    m = imbalance(total)
    cols: dict[str, object] = {
        "layer": pl.Series(layers, dtype=pl.Int16),
        "tokens": (total.sum(axis=1) // k).astype(np.int64),
        "token_routes": total.sum(axis=1).astype(np.int64),
    }
    cols.update({key: m[key] for key in METRICS})
    cols["dead"] = m["dead"].astype(np.int64)
    if phase_known:
        for i, name in enumerate(("prefill", "decode")):
            cols[f"{name}_max_over_mean"] = imbalance(agg.total(i))["max_over_mean"]
    return pl.DataFrame(cols)


def expert_loads(agg: Aggregates) -> pl.DataFrame:
    """One row per (layer, expert): token-routes overall and per phase, share of the layer, load / mean."""
    layers = agg.selection.layers
    E = agg.selection.num_experts
    total = agg.total()
    layer_sum = total.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = total / layer_sum
    return pl.DataFrame(
        {
            "layer": pl.Series(np.repeat(layers, E), dtype=pl.Int16),
            "expert": pl.Series(np.tile(np.arange(E), len(layers)), dtype=pl.Int16),
            "count": total.ravel(),
            "prefill_count": agg.total(0).ravel(),
            "decode_count": agg.total(1).ravel(),
            "share": share.ravel(),
            "load_over_mean": (share * E).ravel(),
        }
    )


# -- batches ----------------------------------------------------------------------------------
def token_matrix(agg: Aggregates, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The sample as whole tokens, in sample order: experts ``(T, L, k)`` (-1 where a layer is absent)
    and ``dup`` (T,) bool, True for a token with two rows in one layer (token positions not recorded).

    Tokens are ordered by their sample hash (a random order, or random forward passes with their
    tokens kept together when the key is ``batch_id``), then by identity; the first ``max_tokens``.
    """
    # The row groups' samples are read where they are, never concatenated (at 10^7 rows the sample holds
    # 9.6 M rows, 0.3 GB: a copy that cost about as much as the rest of this function).
    parts = [p for p in agg.sample_parts if len(p.hash)]
    L, k = len(agg.selection.layers), agg.selection.top_k
    if not parts:
        return np.full((0, L, k), -1, np.int16), np.zeros(0, bool)
    # Step 1: each row's token by hashing the row keys (a hash table, not a sort of every row: the
    # sample holds up to ~1.25 x 58 rows per token); tokens, far fewer, are then sorted by (hash, token).
    starts = np.cumsum([0] + [len(p.hash) for p in parts])
    key = np.empty(starts[-1], np.uint64)  # (hash, token) identify a token; its rows share both
    for i, p in enumerate(parts):  # written in place: no temporary per part, no concatenated copy (76 MB at 10^8 rows)
        np.bitwise_xor(p.token, p.hash, out=key[starts[i] : starts[i + 1]])
    codes = pc.dictionary_encode(pa.array(key, pa.uint64())).indices.to_numpy()  # codes in order of first sight
    del key
    seen = np.maximum.accumulate(codes)  # a code is new where the running max steps up
    first = np.flatnonzero(seen[1:] > seen[:-1]) + 1  # (U,) the first row of each token
    first = np.concatenate([[0], first])
    del seen
    U = first.size
    first_hash, first_token = np.empty(U, np.uint64), np.empty(U, np.uint64)
    part_of = np.searchsorted(starts, first, side="right") - 1
    for i, p in enumerate(parts):
        at = np.flatnonzero(part_of == i)
        first_hash[at], first_token[at] = p.hash[first[at] - starts[i]], p.token[first[at] - starts[i]]
    order = np.lexsort((first_token, first_hash))
    T = min(U, max_tokens)
    # 32-bit indices where they fit (always below 2^31 rows and cells): every array here is as long as
    # the sample (9.6 M rows at 10^7 rows), and fresh memory costs its page faults as much as its use.
    small = max(U, T * L + 1, starts[-1]) < (1 << 31)
    index = np.int32 if small else np.int64
    rank = np.empty(U, index)
    rank[order] = np.arange(U, dtype=index)
    tid = rank[codes]
    del codes
    # Step 2: scatter rows into (token, layer) cells; rows of tokens past the first T go to a spare
    # cell T * L (cheaper than compressing (n, k) rows). A cell nobody wrote keeps the -1 it starts with
    # (written in order, page by page, before the scattered writes).
    spare = T * L
    out = np.full((spare + 1, k), -1, np.int16)
    cells = []
    for i, p in enumerate(parts):
        t = tid[starts[i] : starts[i + 1]]
        cell = np.where(t < T, t * index(L) + p.layer, index(spare))
        rows_of(out)[cell] = rows_of(p.experts)
        cells.append(cell)
    dup = np.zeros(T, bool)
    # Nearly always every kept row has a cell of its own: as many cells written as rows kept, and no row
    # needs checking. A written cell holds a row's expert ids, never negative (the pass refuses them): so
    # as many cells hold one as rows were kept, or some rows share a cell, or a row holds a -1 (then the
    # check below finds which, if any, share one).
    if np.count_nonzero(out[:spare, 0] >= 0) == np.count_nonzero(tid < T):
        return out[:spare].reshape(T, L, k), dup
    # Each cell records the last row written into it: a row that finds another's there shares its cell.
    writer = np.full(spare + 1, -1, index)
    for i, cell in enumerate(cells):
        writer[cell] = np.arange(starts[i], starts[i + 1], dtype=index)
    for i, cell in enumerate(cells):
        clash = cell[(writer[cell] != np.arange(starts[i], starts[i + 1], dtype=index)) & (cell < spare)]
        dup[clash // L] = True
    return out[:spare].reshape(T, L, k), dup


def rows_of(a: np.ndarray) -> np.ndarray:
    """``(n, k)`` as ``(n,)`` opaque rows of k items (a view when contiguous): numpy scatters whole rows
    this way several times faster than along the first axis of a 2-D array (measured 6x for k = 8 int16)."""
    a = np.ascontiguousarray(a)
    return a.view(np.dtype((np.void, a.shape[1] * a.itemsize))).reshape(-1)


def batch_counts(tokens: np.ndarray, batch_size: int, num_experts: int, max_batches: int = MAX_BATCHES,
                 finer: tuple[int, np.ndarray] | None = None) -> np.ndarray:
    """Counts ``(nb, L, E)`` of the first ``nb`` windows of ``batch_size`` consecutive tokens of ``tokens (T, L, k)``.

    ``finer`` = ``(b, counts)``: counts of windows of ``b`` tokens computed before (``b`` divides
    ``batch_size``); when they cover the ``nb`` windows, each window is the sum of its ``batch_size / b``
    finer ones (the same integers, without reading the tokens again).
    """
    T, L, k = tokens.shape
    E = num_experts
    nb = min(max_batches, T // batch_size)
    if nb == 0:
        return np.zeros((0, L, E), np.int64)
    if finer is not None:
        coarser = _summed(finer, batch_size, nb)
        if coarser is not None:
            return coarser
    out = np.empty((nb, L, E), np.int64)
    for b0, counts in _window_counts(tokens, batch_size, E, nb):
        out[b0 : b0 + counts.shape[0]] = counts
    return out


def _summed(finer: tuple[int, np.ndarray], batch_size: int, nb: int) -> np.ndarray | None:
    """Counts ``(nb, L, E)`` of windows of ``batch_size`` tokens as sums of the finer windows' ``(b, counts)``,
    or None when ``b`` does not divide ``batch_size`` or they cover fewer tokens."""
    b, fc = finer
    m = batch_size // b
    if batch_size % b or fc.shape[0] < nb * m:
        return None
    return fc[: nb * m].reshape(nb, m, *fc.shape[1:]).sum(axis=1)


def _window_counts(tokens: np.ndarray, batch_size: int, num_experts: int, nb: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(b0, counts (w, L, E) int64)``: the counts of windows ``b0 .. b0 + w - 1`` of ``batch_size`` consecutive
    tokens of ``tokens (T, L, k)``, a few windows at a time, over the first ``nb`` windows (``nb * batch_size <= T``)."""
    T, L, k = tokens.shape
    E = num_experts
    # Several windows per bincount (ids offset by window): small windows cost one call, not one each;
    # at most about 2^18 ids and 2^18 bins per call keep the temporaries in cache.
    per_call = min(nb, max(1, min((1 << 18) // (batch_size * L * k), (1 << 18) // (L * E))))
    # Ids of up to 2^16 (window, layer, expert) bins are uint16: the additions and bincount's own copy
    # to intp move a quarter of the bytes (measured 1.25x faster at B = 64 and 512). Worth fewer windows
    # per call where a call still counts 2^16 ids or more; ids wrap at an absent slot's -1, left out below.
    narrow = (1 << 16) // (L * E)
    if narrow and narrow < per_call and narrow * batch_size * L * k >= (1 << 16):
        per_call = narrow
    dtype = np.uint16 if per_call * L * E <= (1 << 16) and tokens.dtype == np.int16 else np.intp
    # (window, layer) offsets added in one pass into one buffer reused by every call (measured 1.2-1.5x
    # faster than two additions into fresh arrays)
    offset = ((np.arange(per_call) * (L * E))[:, None, None, None] + np.arange(L)[:, None] * E).astype(dtype)
    buf = np.empty((per_call, batch_size, L, k), dtype)
    src = tokens.view(np.uint16) if dtype == np.uint16 else tokens
    absent = bool((tokens[: nb * batch_size] < 0).any())  # a layer absent for some token: its -1 slots count nowhere
    for b0 in range(0, nb, per_call):
        w = min(nb, b0 + per_call) - b0
        win = tokens[b0 * batch_size : (b0 + w) * batch_size].reshape(w, batch_size, L, k)
        idx = np.add(src[b0 * batch_size : (b0 + w) * batch_size].reshape(w, batch_size, L, k), offset[:w], out=buf[:w])
        if absent:
            idx = idx[win >= 0]
        yield b0, np.bincount(idx.ravel(), minlength=w * L * E).reshape(w, L, E)


def window_stragglers(tokens: np.ndarray, batch_size: int, num_experts: int, nb: int,
                      coarser: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``straggler(batch_counts(tokens, batch_size, num_experts, nb))`` ``(nb, L)``, without holding those counts.

    Each few windows' counts are reduced to their max and sum while they are in cache: the counts of
    256 windows at DeepSeek-V3 shape take 30 MB, fresh memory that cost more to write and read back
    than counting them (measured: B = 8 2.6x, B = 64 1.5x faster). ``coarser`` = ``(m, nc)``: also
    return the counts ``(nc, L, E)`` of the first ``nc`` windows of ``m * batch_size`` tokens, summed
    from these (``nc * m <= nb``), as :func:`batch_counts` gives them; else None.
    """
    L = tokens.shape[1]
    E = num_experts
    maxima, totals = np.empty((nb, L), np.int64), np.empty((nb, L), np.int64)
    m, nc = coarser if coarser is not None else (1, 0)
    coarse = np.zeros((nc, L, E), np.int64) if coarser is not None else None
    for b0, counts in _window_counts(tokens, batch_size, E, nb):
        w = counts.shape[0]
        counts.max(axis=-1, out=maxima[b0 : b0 + w])
        counts.sum(axis=-1, out=totals[b0 : b0 + w])
        for i in range(b0, min(b0 + w, nc * m)):
            coarse[i // m] += counts[i - b0]
    return _straggler(maxima, totals, E), coarse


def straggler(counts: np.ndarray) -> np.ndarray:
    """``max / mean`` of ``counts (..., E)``; NaN where there is no load (cheaper than :func:`imbalance`)."""
    c = np.asarray(counts)
    return _straggler(c.max(axis=-1), c.sum(axis=-1), c.shape[-1])


def _straggler(maxima: np.ndarray, totals: np.ndarray, num_experts: int) -> np.ndarray:
    """``max / mean`` from each count vector's max and sum over its ``num_experts`` experts."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, maxima * num_experts / np.where(totals > 0, totals, 1), np.nan)


def _bootstrap(values: np.ndarray, q: float, rng: np.random.Generator, reps: int = BOOTSTRAP_REPS,
               per_column: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantile ``q`` of ``values (n, m)`` and its 95% bootstrap interval, resampling the n rows (batches).

    Pooled over the m columns (layers) by default, or one result per column with ``per_column``.
    Rows holding a NaN (a batch where some layer has no load) are left out.
    """
    return _bootstraps(values, ((q, per_column),), rng, reps)[0]


def _bootstraps(values: np.ndarray, wanted: Sequence[tuple[float, bool]], rng: np.random.Generator,
                reps: int = BOOTSTRAP_REPS) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`_bootstrap` of ``values`` for each ``(q, per_column)`` of ``wanted``: the same results as
    calling it once for each, in that order with that ``rng`` (each draws its resamples in turn), with
    the sorting of the values shared by all of them."""
    rows = values[np.isfinite(values).all(axis=1)]
    n, m = rows.shape
    if n == 0:
        return [tuple(np.full((m,) if per_column else (), np.nan) for _ in range(3)) for _, per_column in wanted]
    vals, inv = np.unique(rows, return_inverse=True)
    inv = inv.reshape(n, m)
    order = srt = None
    out = []
    for q, per_column in wanted:
        idx = rng.integers(0, n, size=(reps, n))  # drawn whatever the values: the next resamples follow these
        if vals.size == 1:
            # One value (B = 1: max/mean is E/k in every layer whenever a token's experts differ): every quantile
            # of every resample is that value, as np.quantile gives it.
            out.append(tuple(np.full(m, vals[0]) if per_column else vals[0] for _ in range(3)))
            continue
        # How often each row is drawn: a resample is its rows' values repeated, so its quantile can be
        # read off the values sorted once, without building (reps, n, m) copies and sorting each.
        idx += (np.arange(reps) * n)[:, None]
        drawn = np.bincount(idx.ravel(), minlength=reps * n).reshape(reps, n)
        # Every sum below counts values (at most n * m): exact in float32 below 2^24, at half the cost.
        drawn = drawn.astype(np.float32 if n * m < (1 << 24) else np.float64)
        if vals.size <= (FEW_VALUES_COLUMNS if per_column else FEW_VALUES_POOLED):
            point = np.quantile(rows, q, axis=0) if per_column else np.quantile(rows, q)
            boot = _resampled_quantile_values(vals, inv, drawn, q, per_column)
        elif per_column:
            point = np.quantile(rows, q, axis=0)
            if order is None:
                order = np.argsort(rows, axis=0, kind="stable")  # (n, m)
                srt = np.take_along_axis(rows, order, axis=0)
            resampled = _resampled_quantile_rows if n <= FEW_ROWS else _resampled_quantile_columns
            boot = resampled(srt, order, drawn, q)
        else:
            point = np.quantile(rows, q)
            flat = rows.ravel()
            order_flat = np.argsort(flat, kind="stable")
            boot = _resampled_quantile(flat[order_flat], order_flat // m, drawn, q)
        lo, hi = np.quantile(boot, [0.025, 0.975], axis=0)
        out.append((point, lo, hi))
    return out


FEW_VALUES_COLUMNS, FEW_VALUES_POOLED = 48, 128
"""Up to this many distinct values, resample quantiles are read off counts per value (exact, and cheaper
than blocks of ranks): max/mean over B tokens takes at most B + 1 values (1 at B = 1, 7 at B = 8 and
38 at B = 64 on bench/analyze_bench.py's 10^6-row trace)."""
FEW_ROWS = 64
"""Up to this many rows (batches), per-column resample quantiles are read off every rank's cumulative
count, not blocks of ranks (n = 33 at B = 512 and 4 at B = 4096 at 10^6 rows: measured 3x faster)."""


def _resampled_quantile_rows(srt: np.ndarray, order: np.ndarray, drawn: np.ndarray, q: float) -> np.ndarray:
    """``(reps, m)``: :func:`_resampled_quantile_columns` for few rows n: the cumulative draws up to
    every rank of every column, ``(n, m, reps)`` (ranks outermost, so that the sums and counts run
    along whole contiguous rows, not along an axis of n items)."""
    n, m = srt.shape
    h = (n - 1) * q
    prev = int(math.floor(h))
    cum = _running_sum(np.ascontiguousarray(drawn.T)[order])  # (n, m, reps): draws of the rows up to each rank
    col = np.arange(m)[:, None]
    ends = [srt[np.minimum((cum <= p).sum(axis=0), n - 1), col].T for p in (prev, min(prev + 1, n - 1))]
    return _lerp(ends[0], ends[1], h - prev)


def _resampled_quantile_values(vals: np.ndarray, inv: np.ndarray, drawn: np.ndarray, q: float,
                               per_column: bool) -> np.ndarray:
    """:func:`_resampled_quantile` (``(reps,)``) or its columns version (``(reps, m)``) for rows that
    hold few distinct values: ``vals (V,)`` ascending, ``inv (n, m)`` the index of each value in ``vals``.

    cum[., v], the number of a resample's values <= vals[v], is a product of the draws with each row's
    cumulative counts per value; the value at sorted position p is vals[number of v with cum <= p]."""
    n, m = inv.shape
    V = vals.size
    if per_column:
        # (n, V, m): values outermost, so that the counts below run along whole rows of m columns
        per_value = np.zeros((n, V, m), drawn.dtype)
        per_value[np.arange(n)[:, None], inv, np.arange(m)] = 1
        cum = (drawn @ _running_sum(per_value, axis=1).reshape(n, V * m)).reshape(drawn.shape[0], V, m)
        N = n
    else:
        per_value = np.bincount((np.arange(n)[:, None] * V + inv).ravel(), minlength=n * V).reshape(n, V)
        cum = drawn @ np.cumsum(per_value, axis=1).astype(drawn.dtype)  # (reps, V)
        N = n * m
    h = (N - 1) * q
    prev = int(math.floor(h))
    ends = [vals[np.minimum(np.count_nonzero(cum <= p, axis=1), V - 1)] for p in (prev, min(prev + 1, N - 1))]
    return _lerp(ends[0], ends[1], h - prev)


def _running_sum(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """``np.cumsum(a, axis)`` in place, for an axis of few items over many: one vectorised addition
    of whole slices per item (np.cumsum runs along the axis, item by item: measured 8x slower for
    (33, 58, 1000) along axis 0)."""
    view = np.moveaxis(a, axis, 0)
    for i in range(1, view.shape[0]):
        np.add(view[i - 1], view[i], out=view[i])
    return a


def _lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """numpy's lerp in np.quantile: from the nearer end, so that t = 0.5 and t = 1 give what it gives."""
    d = b - a
    return b - d * (1 - t) if t >= 0.5 else a + d * t


def _resampled_quantile(srt: np.ndarray, owner: np.ndarray, drawn: np.ndarray, q: float) -> np.ndarray:
    """``(reps,)`` quantile ``q`` of each resample, exactly as ``np.quantile`` (method "linear") gives it.

    ``srt (N,)`` the values in ascending order, ``owner (N,)`` the row each belongs to, ``drawn
    (reps, n)`` how many times each row is in each resample (every resample holds N values).
    The value at position p of a sorted resample is the first ``srt[j]`` whose cumulative count
    passes p; blocks of the sorted values find j without a (reps, N) cumulative sum.
    """
    N, (reps, n) = srt.size, drawn.shape
    h = (N - 1) * q
    prev = int(math.floor(h))
    t = h - prev
    size = min(64, N)
    blocks = -(-N // size)
    per_block = np.bincount(owner * blocks + np.arange(N) // size, minlength=n * blocks).reshape(n, blocks)
    # (reps, blocks) exact integers; the cumulative sum taken over the few rows before the product, not after
    cum_block = drawn @ np.cumsum(per_block, axis=1).astype(drawn.dtype)
    # The owners of srt padded to whole blocks with a row n that no resample holds: no bounds checks.
    owner_pad = np.full(blocks * size, n, np.intp)
    owner_pad[:N] = owner
    drawn_pad = np.zeros((reps, n + 1), drawn.dtype)
    drawn_pad[:, :n] = drawn
    rep = np.arange(reps)
    ends = []
    for p in (prev, min(prev + 1, N - 1)):
        blk = np.count_nonzero(cum_block <= p, axis=1)  # the block holding position p
        before = np.where(blk > 0, cum_block[rep, np.maximum(blk - 1, 0)], 0)
        w = np.take_along_axis(drawn_pad, owner_pad[blk[:, None] * size + np.arange(size)], axis=1)  # (reps, size)
        j_p = blk * size + np.count_nonzero(before[:, None] + np.cumsum(w, axis=1) <= p, axis=1)
        ends.append(srt[np.minimum(j_p, N - 1)])
    return _lerp(ends[0], ends[1], t)


def _resampled_quantile_columns(srt: np.ndarray, order: np.ndarray, drawn: np.ndarray, q: float) -> np.ndarray:
    """``(reps, m)``: :func:`_resampled_quantile` of each column of ``srt (n, m)`` (sorted per column,
    ``order`` the rows they came from), every column at once, by the same blocks of ranks."""
    n, m = srt.shape
    reps = drawn.shape[0]
    h = (n - 1) * q
    prev = int(math.floor(h))
    t = h - prev
    size = min(16, n)
    blocks = -(-n // size)
    col = np.arange(m)
    # Arrays are laid out with the short axis (blocks, ranks in a block) outermost, so that running sums
    # and counts along it add whole rows (np.cumsum along a short last axis goes item by item).
    in_block = np.zeros((n, blocks, m), drawn.dtype)  # in_block[r, b, c] = 1: row r's value in column c has its rank in block b
    in_block[order, (np.arange(n) // size)[:, None], col] = 1
    # The product of cumulative sums is the cumulative sum of the product (exact integers), on n rows, not reps.
    cum_block = (drawn @ _running_sum(in_block, axis=1).reshape(n, blocks * m)).reshape(reps, blocks, m)
    # The rows of each column's ranks, padded to whole blocks with a row n that no resample holds: (size, m * blocks).
    rows_pad = np.full((m, blocks * size), n, np.intp)
    rows_pad[:, :n] = order.T
    rows_pad = np.ascontiguousarray(rows_pad.reshape(m * blocks, size).T)
    drawn_pad = np.zeros((reps, n + 1), drawn.dtype)
    drawn_pad[:, :n] = drawn
    flat_pad = drawn_pad.ravel()
    rep_base = np.arange(reps) * (n + 1)
    p0, p1 = prev, min(prev + 1, n - 1)
    blk0, blk1 = ((cum_block <= p).sum(axis=1) for p in (p0, p1))  # (reps, m) blocks holding p0, p1

    def rank_in(blk: np.ndarray, cols: np.ndarray, reps_of: np.ndarray, ps: tuple[int, ...]) -> list[np.ndarray]:
        """Ranks of positions ``ps`` in the resamples ``reps_of`` x columns ``cols``, all in block ``blk``."""
        before = np.where(blk > 0, cum_block[reps_of, np.maximum(blk - 1, 0), cols], 0)
        w = flat_pad.take(rows_pad[:, cols * blocks + blk] + rep_base[reps_of])  # (size, ...) draws
        cw = _running_sum(w)
        return [blk * size + (cw <= p - before).sum(axis=0) for p in ps]

    rep = np.arange(reps)[:, None]
    same = blk0 == blk1  # nearly always: p0 and p1 = p0 + 1 fall in one block, read it once
    j0, j1 = rank_in(blk0, col[None, :], rep, (p0, p1))
    if not same.all():
        r_, c_ = np.nonzero(~same)
        j1[r_, c_] = rank_in(blk1[r_, c_], c_, r_, (p1,))[0]
    a = srt[np.minimum(j0, n - 1), col]
    b = srt[np.minimum(j1, n - 1), col]
    return _lerp(a, b, t)


def batch_imbalance(
    tokens: np.ndarray, batch_sizes: Sequence[int], num_experts: int, layers: Sequence[int], seed: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Straggler factor over batches of B tokens, for each B in ``batch_sizes``.

    Returns (pooled, per_layer). ``pooled`` has one row per B: median and p90 of max/mean over every
    (batch, layer), with 95% bootstrap intervals that resample batches (a batch keeps its layers).
    ``per_layer`` has one row per (B, layer) with median and p90 over batches and their intervals.
    A B with no full batch in the sample gets ``batches = 0`` and nulls.
    """
    rng = np.random.default_rng(seed)
    pooled, per_layer = [], []
    T = tokens.shape[0]
    counts: np.ndarray | None = None  # this size's window counts, when summed from the previous size's
    for n, B in enumerate(batch_sizes):
        nb = min(MAX_BATCHES, T // B)
        # The next size's window counts are sums of this one's when it is a multiple of this one and they
        # are few more windows (264 windows of 64 tokens make 33 of 512, where 256 would have it count
        # 16,896 tokens again); not 2,048 windows of 1 token for 256 of 8.
        nxt = batch_sizes[n + 1] if n + 1 < len(batch_sizes) else 0
        m = nxt // B if nxt and nxt % B == 0 else 0
        nc = min(MAX_BATCHES, T // nxt) if m else 0
        if nc * m > 2 * MAX_BATCHES:
            m, nc = 0, 0
        row = {"batch_size": B, "batches": nb}
        if nb == 0:
            pooled.append(row | {k: None for k in ("median", "median_lo", "median_hi", "p90", "p90_lo", "p90_hi")})
            counts = None
            continue
        if counts is not None:
            r = straggler(counts[:nb])  # (nb, L)
            counts = _summed((B, counts), nxt, nc) if nc else None
        else:
            r, counts = window_stragglers(tokens, B, num_experts, max(nb, nc * m), (m, nc) if nc else None)
            r = r[:nb]
        # pooled median and p90, then per layer: resamples drawn in that order
        med, p90, lm, lp = _bootstraps(r, ((0.5, False), (0.9, False), (0.5, True), (0.9, True)), rng)
        pooled.append(row | dict(median=float(med[0]), median_lo=float(med[1]), median_hi=float(med[2]),
                                 p90=float(p90[0]), p90_lo=float(p90[1]), p90_hi=float(p90[2])))
        for li, layer in enumerate(layers):
            per_layer.append(dict(batch_size=B, layer=layer, batches=nb, median=lm[0][li], median_lo=lm[1][li],
                                  median_hi=lm[2][li], p90=lp[0][li], p90_lo=lp[1][li], p90_hi=lp[2][li]))
    schema = {"batch_size": pl.Int64, "batches": pl.Int64}
    pooled_df = pl.DataFrame(pooled, schema_overrides=schema)
    per_layer_df = pl.DataFrame(per_layer, schema_overrides=schema | {"layer": pl.Int16}) if per_layer else pl.DataFrame(
        schema={"batch_size": pl.Int64, "layer": pl.Int16, "batches": pl.Int64, "median": pl.Float64,
                "median_lo": pl.Float64, "median_hi": pl.Float64, "p90": pl.Float64, "p90_lo": pl.Float64,
                "p90_hi": pl.Float64})
    return pooled_df, per_layer_df


def window_imbalance(windows: np.ndarray, layers: Sequence[int], seed: int) -> dict:
    """Straggler factor over the source's own count windows ``(W, L, E)`` (count-only traces)."""
    rng = np.random.default_rng(seed)
    r = straggler(windows)
    med, p90 = _bootstraps(r, ((0.5, False), (0.9, False)), rng)
    routes = windows.sum(axis=(1, 2))
    return dict(windows=int(windows.shape[0]), median=float(med[0]), median_ci=[float(med[1]), float(med[2])],
                p90=float(p90[0]), p90_ci=[float(p90[1]), float(p90[2])],
                mean_token_routes_per_window=float(routes.mean()) if routes.size else 0.0)
