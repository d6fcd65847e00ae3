"""The analysis pass as one task per routing shard, merged in a tree (the ``--engine ray`` path).

A task opens its shard itself (a local path or a URI: every worker reads from storage directly),
runs the same per-row-group work as the local pass (:class:`moeprof.analysis.aggregate._Pass`) and
merges its row groups into one :class:`Partial`. Partials merge exactly:

* per-domain counts add; the request sample's counts add over the union of their sample slots (a
  range when the slots are near each other, an explicit list otherwise), so a shard holding a few
  sampled requests returns a few requests' counts, and none for requests outside the sample;
* the (request, phase) flags unite as sorted lists of what each shard saw;
* samples unite and are cut to their bottom ``sample_tokens`` tokens by ``(hash, token)``, the
  order in which :func:`moeprof.analysis.load.token_matrix` takes tokens. Bottom-k of a union is
  the bottom-k of the parts' bottom-ks, so the cut changes nothing the statistics read and a merged
  sample never holds more than ``sample_tokens`` tokens, however long the trace.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from moeprof.analysis.aggregate import Aggregates, Partial, Selection, TokenSample, plan_routing
from moeprof.analysis.engine import Engine
from moeprof.errors import TraceIntegrityError
from moeprof.trace.fs import checked_parquet
from moeprof.trace.reader import Trace


def bottom_k(sample: TokenSample, cap: int) -> TokenSample:
    """Rows of the ``cap`` tokens with the smallest ``(hash, token)``; ``cap <= 0`` keeps every row."""
    n = len(sample.hash)
    if cap <= 0 or n == 0:
        return sample
    order = np.lexsort((sample.token, sample.hash))
    h, t = sample.hash[order], sample.token[order]
    new = np.ones(n, bool)
    new[1:] = (h[1:] != h[:-1]) | (t[1:] != t[:-1])
    rank = np.cumsum(new) - 1
    if rank[-1] < cap:
        return sample
    keep = np.sort(order[rank < cap])
    return TokenSample(sample.hash[keep], sample.token[keep], sample.layer[keep], sample.experts[keep])


def _slots(p: Partial) -> np.ndarray:
    return p.slots if p.slots is not None else np.arange(p.lo, p.lo + p.counts.shape[0])


def merge_partials(a: Partial, b: Partial, k: int, cap: int, max_rows: int = 0) -> Partial:
    """One :class:`Partial` holding both (counts summed per request slot, samples united).

    The united sample is cut to its bottom ``cap`` tokens once it holds more than ``max_rows`` rows
    (a token has a row per layer): cutting costs a sort, so it waits until the sample has doubled."""
    sample = TokenSample.concat([a.sample, b.sample], k)
    if len(sample.hash) > max_rows:
        sample = bottom_k(sample, cap)
    rows, phases = a.rows + b.rows, a.phases_seen | b.phases_seen
    domains = b.domains if a.domains is None else a.domains if b.domains is None else a.domains + b.domains
    seen = np.union1d(a.seen, b.seen) if a.seen.size and b.seen.size else (a.seen if a.seen.size else b.seen)
    lo, counts, slots = _merge_counts(a, b)
    keys, values = _merge_sparse(a, b)
    return Partial(lo, counts, slots, sample, rows, phases, domains, seen, keys, values)


def _merge_sparse(a: Partial, b: Partial) -> tuple[np.ndarray, np.ndarray]:
    """Sparse request-sample counts of both: keys united, values summed per key."""
    if not a.keys.size or not b.keys.size:
        return (a.keys, a.values) if a.keys.size else (b.keys, b.values)
    return sum_by_key([a.keys, b.keys], [a.values, b.values])


def sum_by_key(keys: list[np.ndarray], values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys of the concatenated ``keys`` and the sum of ``values`` per key (int64)."""
    uniq, inv = np.unique(np.concatenate(keys), return_inverse=True)
    out = np.zeros(uniq.size, np.int64)
    np.add.at(out, inv.reshape(-1), np.concatenate(values))
    return uniq, out


def _merge_counts(a: Partial, b: Partial) -> tuple[int, np.ndarray, np.ndarray | None]:
    """The request sample's counts of both, summed per slot: ``(lo, counts, slots)`` as in :class:`Partial`."""
    if b.counts.shape[0] == 0 or a.counts.shape[0] == 0:
        c = b if b.counts.shape[0] else a
        return c.lo, c.counts, c.slots
    if a.slots is None and b.slots is None:
        lo = min(a.lo, b.lo)
        hi = max(a.lo + a.counts.shape[0], b.lo + b.counts.shape[0])
        if hi - lo <= 2 * (a.counts.shape[0] + b.counts.shape[0]):  # near each other: one range
            counts = np.zeros((hi - lo,) + a.counts.shape[1:], np.int64)
            counts[a.lo - lo : a.lo - lo + a.counts.shape[0]] += a.counts
            counts[b.lo - lo : b.lo - lo + b.counts.shape[0]] += b.counts
            return lo, counts, None
    sa, sb = _slots(a), _slots(b)
    slots = np.union1d(sa, sb)
    counts = np.zeros((slots.size,) + a.counts.shape[1:], np.int64)
    counts[np.searchsorted(slots, sa)] += a.counts
    counts[np.searchsorted(slots, sb)] += b.counts
    return 0, counts, slots


class ShardWork:
    """What every shard task needs, shipped once per run: the per-row-group pass, columns, sample cap."""

    def __init__(self, work: Any, columns: list[str], cap: int) -> None:
        self.work, self.columns, self.cap = work, columns, cap
        self.max_rows = 2 * cap * work.L  # a token has at most L rows: at most twice the cut's size

    @property
    def k(self) -> int:
        return self.work.k

    def merger(self) -> Callable[[Partial, Partial], Partial]:
        """The merge alone, small to ship to merge tasks (a bound method would carry the pass's tables)."""
        return functools.partial(merge_partials, k=self.k, cap=self.cap, max_rows=self.max_rows)


def shard_partial(item: tuple[str, str], shared: ShardWork) -> Partial:
    """One routing shard -> one :class:`Partial`, row group by row group.

    The task reads the shard's bytes once and checks them against the manifest's sha256 before
    decoding: a flipped byte inside a compressed page can decode to valid-looking expert ids, and
    hashing costs little next to decoding (the local engine checks footers only, like ``analyze``).
    """
    location, sha256 = item
    pf = checked_parquet(location, sha256)
    groups = pf.num_row_groups
    empty = TokenSample.empty(shared.k)
    acc = shared.work.empty_partial()
    samples, seen, sparse = [], [], []  # kept apart and joined once: joining at every row group would copy them again and again
    for i in range(groups):
        where = f"{location} (row group {i})"
        try:
            table = pf.read_row_group(i, columns=shared.columns, use_threads=False)
        except (pa.ArrowException, OSError) as exc:
            raise TraceIntegrityError(f"{where}: cannot be decoded ({exc}); the shard is corrupt") from None
        part = shared.work(table, where)
        del table
        samples.append(part.sample)
        seen.append(part.seen)
        sparse.append((part.keys, part.values))
        part.sample, part.seen, part.keys, part.values = empty, seen[-1][:0], part.keys[:0], part.values[:0]
        acc = merge_partials(acc, part, shared.k, shared.cap)
    acc.sample = TokenSample.concat(samples, shared.k)
    acc.seen = np.unique(np.concatenate(seen)) if seen else acc.seen
    if any(keys.size for keys, _ in sparse):
        acc.keys, acc.values = sum_by_key([k for k, _ in sparse], [v for _, v in sparse])
    if len(acc.sample.hash) > shared.max_rows:
        acc.sample = bottom_k(acc.sample, shared.cap)
    return acc


def aggregate_shards(trace: Trace, sel: Selection, engine: Engine,
                     progress: Callable[[int], None] | None = None) -> Aggregates:
    """The routing pass on ``engine``: one task per shard, partials merged in a tree, then into
    :class:`Aggregates` exactly as the local pass builds them (same sample threshold and key)."""
    agg, work, columns = plan_routing(trace, sel, trace.num_routing_rows)
    shared = ShardWork(work, columns, sel.sample_tokens if sel.sample_tokens > 0 else 0)
    items = [(str(p), s.sha256) for p, s in zip(trace.shard_paths("routing"), trace.manifest.shards_of("routing"))]
    part = engine.map_reduce(shard_partial, items, shared.merger(), shared=shared, progress=progress)
    if part is not None:
        agg.merge(part)
    return agg
