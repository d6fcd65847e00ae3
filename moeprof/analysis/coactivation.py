"""Co-activation: which experts a token selects together, within a layer and across layers.

From the token sample ``tokens (T, L, k)`` (expert ids of every token in every selected layer, -1
where a layer is absent; see :func:`moeprof.analysis.load.token_matrix`):

- ``pairs[l, a, b]``: tokens whose top-k in layer l holds both a and b (a != b; symmetric);
  ``pair lift`` = P(a and b) / (P(a) P(b)), > 1 when two experts are picked together more than chance;
- ``transitions[i, e, e']``: tokens routed to e in MoE layer l_i and to e' in the next MoE layer
  l_{i+1}; ``P(e'|e)`` = transitions / tokens routed to e in l_i, the chance that a token sent to e
  is sent to e' next (rows sum to k, since a token picks k experts in the next layer). The uniform
  baseline is k/E.

Tables (``tables``): ``"full"`` writes every non-zero pair and transition (about 1.4 M and 3.4 M rows
at DeepSeek-V3 shape, whatever the trace's size); ``"top"`` (the default) keeps the rows of those
tables where one expert is the other's most frequent partner (pairs) or ``e'`` is e's most frequent
next expert (transitions), ties kept: about E rows per layer, in the same columns and order.
"""

from __future__ import annotations

import queue
from concurrent.futures import Executor
from typing import Sequence

import numpy as np
import polars as pl

DEFAULT_TOKENS = 1 << 15
"""Tokens of the sample used for co-activation: k*k transitions per token and layer pair add up fast."""
TABLES = ("top", "full")
"""What the co-activation tables hold: each expert's most frequent partners, or every non-zero row."""
TOP_MIN_COUNT = 10
"""Pairs seen fewer times are left out of the summary's top pairs by lift (a lift from 2 tokens is noise)."""
LAYERS_A_TAKE = 4
"""Layers counted at a time by each thread of :func:`counts` (a step out of the last is counted with it)."""


def counts(tokens: np.ndarray, steps: Sequence[tuple[int, int]], num_experts: int,
           pool: Executor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every count of co-activation in one pass over the layers of ``tokens (T, L, k)``:

    - ``loads (L, E)``: tokens routed to each expert (every slot that is set);
    - ``pairs (L, E, E)``: symmetric co-selection counts within each layer, zero diagonal (tokens
      with every slot of the layer set);
    - ``transitions (P, E, E)``: tokens routed to e in layer i and e' in layer j, for each (i, j) in
      ``steps`` (tokens with every slot of both layers set).

    Each layer's ids are converted once and serve all three (converting them again for every count
    cost as much as counting). With ``pool``, one of its threads counts layers beside the calling
    thread, as soon as it is free (bincount and numpy's arithmetic release the GIL).
    All int64; integer sums, so the result does not depend on the split or on the order of counting.
    """
    T, L, k = tokens.shape
    E = num_experts
    loads = np.zeros((L, E), np.int64)
    pairs = np.zeros((L, E, E), np.int64)
    trans = np.zeros((len(steps), E * E), np.int64)
    every = bool((tokens >= 0).all())  # nearly always: no token lacks a layer, no masks below
    step_of: dict[int, list[tuple[int, int]]] = {}
    for p, (i, j) in enumerate(steps):
        step_of.setdefault(i, []).append((p, j))

    # Pair ids a * E + b below 2^16 (E <= 256) are uint16: the ids are built and handed to bincount (which
    # copies them to intp) at a quarter of the bytes (measured 1.1x faster at DeepSeek-V3 shape).
    small = E * E <= (1 << 16)

    def layer(li: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(k, T) ids of layer li, slot by slot (an absent slot's -1 wraps in uint16: always masked), and which
        tokens have every slot set (None: all of them)."""
        t = tokens[:, li]
        if t.strides[1] == t.itemsize:
            # The layer's rows gathered as opaque rows of k ids first, then transposed in cache: transposing
            # them where they lie, every L * k ids apart, read one id at a time (measured 2.3x slower).
            t = t.view(np.dtype((np.void, k * t.itemsize))).copy().view(t.dtype).reshape(T, k)
        # Slot-major: every id array below is built from whole rows of T ids, where (T, k) rows of a few ids
        # made numpy's additions loop over a short inner axis (measured: building the pair ids cost more
        # than counting them, and the pairs 2x faster slot-major, at T = 17,242, k = 8).
        return t.T.astype(np.uint16 if small else np.intp, order="C"), None if every else (t >= 0).all(axis=1)

    def count(layers: range) -> None:
        held: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        for li in layers:
            x, ok = held.pop(li, None) or layer(li)
            xs = x if ok is None else x[:, ok]
            if xs.size and k > 1:
                high = xs * E
                # Slot c1 against the slots after it, every pair's ids in one array counted at once
                # (k(k-1)/2 rows of T ids: 0.5 M at T = 17,242, k = 8, 2x faster than a bincount per slot).
                ids = np.empty((k * (k - 1) // 2, xs.shape[1]), xs.dtype)
                n = 0
                for c1 in range(k - 1):
                    np.add(high[c1], xs[c1 + 1 :], out=ids[n : n + k - 1 - c1])
                    n += k - 1 - c1
                sq = np.bincount(ids.reshape(-1), minlength=E * E).reshape(E, E)
                np.add(sq, sq.T, out=pairs[li])
            for p, j in step_of.get(li, ()):
                if j not in held:
                    held[j] = layer(j)
                y, ok_j = held[j]
                both = ok if ok_j is None else ok_j if ok is None else ok & ok_j
                a, b = (x, y) if both is None else (x[:, both], y[:, both])
                if a.shape[1] == 0:
                    continue
                high = a * E
                # A few slots of the first layer at a time, against every slot of the second: at most 2^19 ids
                # a bincount (whose intp copy of them takes 4 MB), or one slot. Beside the other statistics on
                # two cores, measured with batch imbalance on the other core: 3 slots a call (T = 17,242) 0.94x
                # the time of one slot a call, 8 slots a call 1.07x (faster alone: the cores share their caches).
                per = max(1, min(k, (1 << 19) // (k * a.shape[1])))
                ids = np.empty((per,) + b.shape, high.dtype)
                for s in range(0, k, per):
                    w = min(k, s + per) - s
                    np.add(high[s : s + w, None], b, out=ids[:w])
                    if s == 0:  # written before it is read: its fresh pages are not first mapped to the zero page
                        trans[p] = np.bincount(ids[:w].reshape(-1), minlength=E * E)
                    else:
                        trans[p] += np.bincount(ids[:w].reshape(-1), minlength=E * E)
            if every and step_of.get(li):
                # Every token has every slot of both layers: each of its routes to e here meets the k of the next
                # layer, so the row sums of a step's transitions are k times these loads (exact integers; a
                # bincount of the layer's ids cost 4x more).
                loads[li] = trans[step_of[li][0][0]].reshape(E, E).sum(axis=1) // k
            else:
                # bincount, not np.add.at: it counts without holding the GIL the other threads need
                loads[li] += np.bincount((x if ok is None else x[tokens[:, li].T >= 0]).reshape(-1), minlength=E)

    # Layers a few at a time from one queue, taken by this thread and, with ``pool``, by one of the pool's as soon
    # as it has a thread free: where the pool's threads are as many as the cores and busy with the other
    # statistics, this thread counts most layers and the pool's takes the rest once free (half the layers each,
    # on a third thread, cost 1.1x the CPU and took 1.1x as long beside batch imbalance on two cores).
    todo: queue.SimpleQueue[range] = queue.SimpleQueue()
    for lo in range(0, L, LAYERS_A_TAKE):
        todo.put(range(lo, min(L, lo + LAYERS_A_TAKE)))

    def take() -> None:
        while True:
            try:
                count(todo.get_nowait())
            except queue.Empty:
                return

    job = pool.submit(take) if pool is not None and L > LAYERS_A_TAKE else None
    take()
    # Not started by now (every pool thread busy): nothing left for it, and waiting for a thread to come free
    # could wait on a job that waits on this one.
    if job is not None and not job.cancel():
        job.result()
    return loads, pairs, trans.reshape(len(steps), E, E)


def pair_counts(tokens: np.ndarray, num_experts: int) -> np.ndarray:
    """``(L, E, E)`` int64 symmetric co-selection counts within each layer (zero diagonal)."""
    return counts(tokens, [], num_experts)[1]


def consecutive_pairs(layers: Sequence[int], moe_layers: Sequence[int]) -> list[tuple[int, int]]:
    """Indices (i, j) into ``layers`` of selected layers that are consecutive MoE layers of the model."""
    order = {layer: n for n, layer in enumerate(moe_layers)}
    pos = {layer: i for i, layer in enumerate(layers)}
    out = []
    for layer in layers:
        n = order.get(layer)
        if n is not None and n + 1 < len(moe_layers) and moe_layers[n + 1] in pos:
            out.append((pos[layer], pos[moe_layers[n + 1]]))
    return out


def transition_counts(tokens: np.ndarray, pairs: Sequence[tuple[int, int]], num_experts: int) -> np.ndarray:
    """``(P, E, E)`` int64: tokens routed to e in layer i and e' in layer j, for each (i, j) in ``pairs``."""
    return counts(tokens, pairs, num_experts)[2]


def layer_counts(tokens: np.ndarray, num_experts: int) -> np.ndarray:
    """``(L, E)`` tokens routed to each expert, over the sample."""
    return counts(tokens, [], num_experts)[0]


def conditional(transitions: np.ndarray, from_counts: np.ndarray) -> np.ndarray:
    """P(e'|e) ``(P, E, E)`` from transition counts and tokens routed to e in the first layer ``(P, E)``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(from_counts[..., None] > 0, transitions / np.maximum(from_counts[..., None], 1), np.nan)


def most_frequent(counts: np.ndarray) -> np.ndarray:
    """``(..., E, E)`` bool: cells holding the largest non-zero count of their row (ties all kept)."""
    best = counts.max(axis=-1, keepdims=True)
    return (counts == best) & (best > 0)


def top_pairs(pairs: np.ndarray) -> np.ndarray:
    """``(L, E, E)`` bool, symmetric: (a, b) where b is a's most frequent partner or a is b's."""
    top = most_frequent(pairs)
    return top | top.transpose(0, 2, 1)


def _upper(num_experts: int) -> np.ndarray:
    """``(E, E)`` bool: the cells (a, b) with a < b."""
    return np.triu(np.ones((num_experts, num_experts), bool), 1)


def nonzero_pairs(pairs: np.ndarray) -> int:
    """Pairs (a < b) seen together at least once, over every layer: the rows of the full pair table."""
    return int(np.count_nonzero((pairs != 0) & _upper(pairs.shape[-1])))


def _pair_values(pairs: np.ndarray, loads: np.ndarray, tokens_per_layer: np.ndarray, flat: np.ndarray
                 ) -> tuple[np.ndarray, ...]:
    """Layer index, a, b, count and lift of the pairs at ``flat`` (flat ids into ``pairs (L, E, E)``)."""
    E = pairs.shape[1]
    li, ab = np.divmod(flat, E * E)
    a, b = np.divmod(ab, E)
    count = pairs.reshape(-1)[flat]
    T = tokens_per_layer[li].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        lift = (count / T) / ((loads[li, a] / T) * (loads[li, b] / T))
    return li, a, b, count, lift


def _pair_rows(pairs: np.ndarray, loads: np.ndarray, tokens_per_layer: np.ndarray, layers: Sequence[int],
               flat: np.ndarray) -> pl.DataFrame:
    """Rows of the pair table at ``flat``, ascending flat ids into ``pairs (L, E, E)`` with a < b."""
    li, a, b, count, lift = _pair_values(pairs, loads, tokens_per_layer, flat)
    # Layer and expert ids are int16 in the trace: cast in numpy, several times cheaper than polars' checked cast.
    return pl.DataFrame({
        "layer": pl.Series(np.asarray(layers, np.int16)[li]),
        "expert_a": pl.Series(a.astype(np.int16)),
        "expert_b": pl.Series(b.astype(np.int16)),
        "count": count,
        "lift": lift,
    })


def pair_table(pairs: np.ndarray, loads: np.ndarray, tokens_per_layer: np.ndarray, layers: Sequence[int],
               keep: np.ndarray | None = None) -> pl.DataFrame:
    """Non-zero pairs (a < b) per layer with count and lift; ``loads (L, E)``, ``tokens_per_layer (L,)``.
    ``keep (L, E, E)`` bool: only those pairs (e.g. :func:`top_pairs`)."""
    mask = (pairs != 0) & _upper(pairs.shape[-1])
    if keep is not None:
        mask &= keep
    # flat ids in (layer, a, b) order, as np.nonzero gives; 1-D takes beat 3-D fancy indexing
    return _pair_rows(pairs, loads, tokens_per_layer, layers, np.flatnonzero(mask))


def top_by_lift(pairs: np.ndarray, loads: np.ndarray, tokens_per_layer: np.ndarray, layers: Sequence[int],
                n: int = 10, min_count: int = TOP_MIN_COUNT) -> pl.DataFrame:
    """The ``n`` pairs of highest lift among those seen ``min_count`` times or more: the rows of the full
    :func:`pair_table` filtered and sorted (stable) by lift, built from the few candidates alone."""

    def best(cand: np.ndarray) -> np.ndarray:
        """The flat ids ``cand`` (ascending) whose lift is at least the n-th largest among them."""
        if cand.size <= n:
            return cand
        # lifts are finite here (count > 0); pairs tied with the n-th largest stay, so the stable sort
        # picks as among all rows
        lift = _pair_values(pairs, loads, tokens_per_layer, cand)[-1]
        return cand[lift >= np.partition(lift, lift.size - n)[lift.size - n]]

    E = pairs.shape[-1]
    upper = _upper(E)
    # Each layer's n best hold the n best of all (ties kept). Layer by layer, the candidates' arrays
    # stay small, where those of every layer at once (0.5 M at 10^6 rows) took tens of MB of fresh memory.
    cand = best(np.concatenate([best(np.flatnonzero((pairs[li] >= min_count) & upper) + li * E * E)
                                for li in range(pairs.shape[0])]))
    rows = _pair_rows(pairs, loads, tokens_per_layer, layers, cand)
    return rows.sort("lift", descending=True, maintain_order=True).head(n)


def transition_table(trans: np.ndarray, from_counts: np.ndarray, pairs: Sequence[tuple[int, int]],
                     layers: Sequence[int], keep: np.ndarray | None = None) -> pl.DataFrame:
    """Non-zero transitions with count and P(e'|e) (as :func:`conditional` gives it); ``from_counts
    (P, E)`` tokens routed to e in the first layer; ``keep (P, E, E)`` bool: only those (e.g.
    :func:`most_frequent`, each expert's most frequent next experts)."""
    E = trans.shape[-1]
    # flat ids in (pair, e, e') order; 1-D takes beat 3-D fancy indexing
    nz = np.flatnonzero(trans if keep is None else keep & (trans > 0))
    p, rest = np.divmod(nz, E * E)
    e, e2 = np.divmod(rest, E)
    src = np.array([layers[i] for i, _ in pairs], np.int16)  # int16 ids, as in pair_table
    dst = np.array([layers[j] for _, j in pairs], np.int16)
    count = trans.reshape(-1).take(nz)
    return pl.DataFrame({
        "layer": pl.Series(src[p], dtype=pl.Int16),
        "next_layer": pl.Series(dst[p], dtype=pl.Int16),
        "expert": pl.Series(e.astype(np.int16)),
        "next_expert": pl.Series(e2.astype(np.int16)),
        "count": count,
        # a transition from e means e has tokens: the same division as conditional's, for these rows only
        "p_next_given_expert": count / from_counts.reshape(-1).take(nz // E),
    })


def concentration(trans: np.ndarray, from_counts: np.ndarray) -> np.ndarray:
    """``(P,)`` load-weighted mean over e of max_e' P(e'|e): 1.0 when e fixes a next expert.

    From the counts ``trans (P, E, E)``: max_e' (n(e, e') / n(e)) is max_e' n(e, e') / n(e), the same
    float (dividing by a positive number keeps the order), without the (P, E, E) division."""
    w = from_counts.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        best = np.where(from_counts > 0, trans.max(axis=-1) / np.maximum(from_counts, 1), 0.0)
        return (best * w).sum(axis=-1) / w.sum(axis=-1)
