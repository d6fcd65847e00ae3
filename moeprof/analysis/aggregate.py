"""Mergeable partial aggregates of a trace: every statistic of ``analyze`` is computed from these.

One streaming pass over the routing rows (row group by row group, on a thread pool) produces, per
row group, a :class:`Partial`; partials merge by sum (counts), by union (flags) and by
union-then-bottom-k (the token sample), so the same code runs over one file, many files in
parallel, or shards spread over a cluster. Memory is bounded by the aggregates, never by the trace
nor by its number of requests (phase 0 is prefill, 1 is decode):

``domains`` ``(D + 1, 2, L, E)`` int64, token-routes per domain x phase x layer x expert, over every
            row; group ``D`` holds rows whose request is not listed in ``requests.parquet``.
            Per-phase and whole-trace counts are sums of it: exact, however many requests.
``sampled`` ``(S, 2, L, E)`` int32, token-routes of each request of the request sample: the
            ``sample_requests`` listed requests with the smallest hash of (seed, request id),
            chosen from ``requests.parquet`` before any row is read (every request when the trace
            lists at most that many). Per-request statistics (classification, prefill->decode) read
            these; at DeepSeek-V3 shape a request's counts take 116 KiB, so keeping every request's
            would cost 111 GiB at 10^6 requests. Sampled requests with few rows in a row group are
            counted sparse ((flat index, count) pairs) rather than in mostly-empty dense bins.
``seen``    ``(R, 2)`` bool, whether each listed request has routing rows of each phase (how many
            requests the trace holds, per domain, and how many the sample left out).
``sample``  a seeded bottom-k sample of whole tokens (their expert ids in every layer), keyed by a
            hash of the token, or of its forward pass (``batch_id``) when the trace has one, so
            batches drawn from the sample are made of real forward passes. Batch-level imbalance and
            co-activation are computed from it; when the trace holds fewer tokens than the sample's
            size, the sample is the whole trace and those statistics are exact.

Traces that hold only count tables (``loads/``) fill ``counts`` from them; what counts cannot give
(batches of B tokens, co-activation) is marked unavailable with the reason.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from moeprof.errors import AnalysisError, TraceIntegrityError
from moeprof.text import format_ranges
from moeprof.trace.fs import parquet_file
from moeprof.trace.reader import ShardReader, Trace
from moeprof.trace.schema import PHASES

DEFAULT_SAMPLE_TOKENS = 1 << 17
"""Tokens in the sample behind batch-level imbalance and co-activation (exact below this size)."""

DEFAULT_SAMPLE_REQUESTS = 4096
"""Requests whose own counts are kept, for classification and prefill->decode (exact below this number).
At DeepSeek-V3 shape (58 MoE layers x 256 experts) their counts take 0.45 GiB, and the two statistics
about as much again at their peak: analyze of 10^6 requests peaked at 2.1-2.5 GiB with 4096, 3.3 GiB
with 8192 (``bench/analyze_memory.py``), against a goal of 4 GiB."""

MIN_SLICE_ROWS = 1 << 18
"""Rows decoded and counted at a time: a row group is read in batches of this many rows (their buffers
reused from one to the next), counted on several threads when there are fewer row groups than threads
(a trace of one row group, 10^6 rows); below this many rows a batch's fixed cost (its bins) is not worth it."""

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray, copy: bool = True) -> np.ndarray:
    """Shape-preserving uint64 hash (the splitmix64 finaliser): a seeded, uniform sort key.

    ``copy=False`` hashes a uint64 ``x`` in place. In place, with one scratch array: the pass hashes
    every row twice, and each temporary is fresh memory, whose page faults cost as much as the hashing."""
    z = x.astype(np.uint64, copy=copy)
    t = np.empty_like(z)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            np.right_shift(z, np.uint64(shift), out=t)
            z ^= t
            z *= np.uint64(mult)
        np.right_shift(z, np.uint64(31), out=t)
        z ^= t
    return z


def request_hash(request_ids: np.ndarray, seed: int) -> np.ndarray:
    """``(n,)`` uint64 sort key of each request for the request sample: a hash of (seed, request id).

    The seed is hashed first so that the key is unrelated to the token sample's (which hashes the
    token's identity XOR the seed)."""
    salt = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64) ^ np.uint64(0x5265717565737473))[0]
    return splitmix64(np.asarray(request_ids).astype(np.uint64) ^ salt)


def hash_order(request_ids: np.ndarray, seed: int) -> np.ndarray:
    """Indices of ``request_ids`` in the order of the request sample: by ``(request_hash, request id)``."""
    return np.lexsort((request_ids, request_hash(request_ids, seed)))


def sample_requests(request_ids: np.ndarray, candidates: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices (sorted) of the ``k`` candidates with the smallest ``(request_hash, request id)``.

    ``request_ids (R,)`` int64; ``candidates`` indices into it. Bottom-k by a hash is mergeable and
    needs no pass over the rows: any engine, any shard order picks the same requests."""
    candidates = np.asarray(candidates, np.int64)
    if candidates.size <= k:
        return np.sort(candidates)
    order = hash_order(request_ids[candidates], seed)
    return np.sort(candidates[order[:k]])


@dataclass
class Selection:
    """What to analyse: MoE layers (model numbering), requests (by domain), sample settings."""

    layers: list[int]
    domains: list[str]
    request_ids: np.ndarray  # (R,) int64, sorted: requests listed in requests.parquet
    request_domain: np.ndarray  # (R,) int32 index into ``domains``, -1 for a domain left out
    num_experts: int
    top_k: int
    seed: int = 0
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS
    keep_unlisted: bool = True  # rows of requests missing from requests.parquet (group D)
    sampled: np.ndarray | None = None  # (S,) int64 sorted indices into request_ids; None: every selected request
    model_layers: list[int] | None = None  # the manifest's MoE layers: a row of any other is an error (None: no check)

    def __post_init__(self) -> None:
        if self.sampled is None:
            self.sampled = np.flatnonzero(self.request_domain >= 0).astype(np.int64)


@dataclass
class TokenSample:
    """Bottom-k sample of tokens. Row arrays of one entry per (token, layer) routing row."""

    hash: np.ndarray  # (n,) uint64 sort key of the token (or of its forward pass)
    token: np.ndarray  # (n,) uint64 the token's identity: hash of (request_id, step, pos)
    layer: np.ndarray  # (n,) int16 index into Selection.layers
    experts: np.ndarray  # (n, k) int16

    @classmethod
    def empty(cls, k: int) -> "TokenSample":
        return cls(np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.int16), np.empty((0, k), np.int16))

    @classmethod
    def concat(cls, parts: Sequence["TokenSample"], k: int) -> "TokenSample":
        parts = [p for p in parts if len(p.hash)]
        if not parts:
            return cls.empty(k)
        if len(parts) == 1:
            return parts[0]
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("hash", "token", "layer", "experts")))


@dataclass
class Partial:
    """Aggregates of some rows: per-domain counts, counts of sampled requests, flags, sampled tokens.

    ``counts`` rows are request-sample slots ``lo .. lo + counts.shape[0] - 1``, or the slots listed
    in ``slots`` (if not None); ``keys``/``values`` add more, sparse (requests with few rows).
    ``seen`` holds ``2 * request index + phase`` of every listed request and phase that has rows
    here, sorted and unique (sparse: a shard names only its own requests).
    """

    lo: int
    counts: np.ndarray  # (s, 2, L, E) int64
    slots: np.ndarray | None
    sample: TokenSample
    rows: int
    phases_seen: np.ndarray  # (2,) bool
    domains: np.ndarray | None = None  # (D + 1, 2, L, E) int64; None: no rows
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # more request-sample counts, sparse: sorted unique flat indices into (S, 2, L, E), and counts
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class Aggregates:
    """Merged counts, flags and token sample of a trace (or of any set of its shards)."""

    selection: Selection
    domains: np.ndarray  # (D + 1, 2, L, E) int64, group D: requests not listed in requests.parquet
    sampled: np.ndarray  # (S, 2, L, E) int32, the requests of selection.sampled in that order
    seen: np.ndarray  # (R, 2) bool
    sample_parts: list[TokenSample] = field(default_factory=list)
    rows: int = 0
    tokens_estimate: int = 0
    sample_fraction: float = 1.0  # share of hash space kept: 1.0 means every token was kept
    sample_key: str = "token"  # "token" or "batch_id"
    phases_seen: np.ndarray = field(default_factory=lambda: np.zeros(2, bool))
    per_token: bool = True
    windows: np.ndarray | None = None  # (W, L, E) counts per window of a count-only trace
    domain_extra: np.ndarray | None = None  # (D, 2, L, E) count rows with a domain but no request

    @classmethod
    def empty(cls, sel: Selection, **kw) -> "Aggregates":
        L, E = len(sel.layers), sel.num_experts
        return cls(
            selection=sel,
            domains=np.zeros((len(sel.domains) + 1, 2, L, E), np.int64),
            sampled=np.zeros((len(sel.sampled), 2, L, E), np.int32),
            seen=np.zeros((len(sel.request_ids), 2), bool),
            **kw,
        )

    @property
    def sample(self) -> TokenSample:
        """Every sampled row, concatenated once (partials are kept apart while merging)."""
        if len(self.sample_parts) != 1:
            self.sample_parts = [TokenSample.concat(self.sample_parts, self.selection.top_k)]
        return self.sample_parts[0]

    def merge(self, part: Partial) -> None:
        """Add ``part`` into these aggregates (sums of counts, union of flags and of sampled rows)."""
        if part.counts.shape[0]:
            if part.slots is None:
                self.sampled[part.lo : part.lo + part.counts.shape[0]] += part.counts.astype(np.int32, copy=False)
            else:
                self.sampled[part.slots] += part.counts.astype(np.int32, copy=False)
        if part.keys.size:
            np.add.at(self.sampled.reshape(-1), part.keys, part.values.astype(np.int32))
        if part.domains is not None:
            self.domains += part.domains
        if part.seen.size:
            self.seen.reshape(-1)[part.seen] = True
        if len(part.sample.hash):
            self.sample_parts.append(part.sample)
        self.rows += part.rows
        self.phases_seen |= part.phases_seen

    def __iadd__(self, other: "Aggregates") -> "Aggregates":
        """Merge another trace's aggregates over the same selection (counts add, samples unite)."""
        self.domains += other.domains
        self.sampled += other.sampled
        self.seen |= other.seen
        if other.domain_extra is not None:
            self.domain_extra = other.domain_extra + (0 if self.domain_extra is None else self.domain_extra)
        self.sample_parts.extend(other.sample_parts)
        self.rows += other.rows
        self.tokens_estimate += other.tokens_estimate
        self.phases_seen |= other.phases_seen
        return self

    # -- derived counts ---------------------------------------------------------------------
    @property
    def listed_routes(self) -> int:
        """Token-routes of requests listed in requests.parquet."""
        return int(self.domains[:-1].sum())

    @property
    def unlisted_routes(self) -> int:
        """Token-routes of requests not listed in requests.parquet."""
        return int(self.domains[-1].sum())

    @property
    def whole_trace_requests(self) -> bool:
        """True when the request sample holds every selected request."""
        return len(self.selection.sampled) == int((self.selection.request_domain >= 0).sum())

    def total(self, phase: int | None = None) -> np.ndarray:
        """``(L, E)`` int64 token-routes over every selected row (one phase if given)."""
        sl = slice(None) if phase is None else slice(phase, phase + 1)
        out = self.domains[:, sl].sum(axis=(0, 1))
        if self.domain_extra is not None:
            out += self.domain_extra[:, sl].sum(axis=(0, 1))
        return out

    def by_domain(self) -> np.ndarray:
        """``(D, 2, L, E)`` int64 counts per selected domain."""
        out = self.domains[:-1].copy()
        if self.domain_extra is not None:
            out += self.domain_extra
        return out


# -- the streaming pass -------------------------------------------------------------------------
class _Pass:
    """Per-row-group work: map ids to dense indices, bincount, keep sampled rows.

    The maps from request id to request index, domain group and request-sample slot are built once
    per run (sized by the requests, not by the rows) and shared by every row group."""

    def __init__(self, sel: Selection, threshold: np.uint64 | None, use_batch_id: bool) -> None:
        self.sel = sel
        self.L, self.E, self.k = len(sel.layers), sel.num_experts, sel.top_k
        self.R = len(sel.request_ids)
        self.D = len(sel.domains)
        self.threshold = threshold  # None: keep every row in the sample
        self.use_batch_id = use_batch_id
        self.seed = np.uint64(sel.seed & 0xFFFFFFFFFFFFFFFF)
        self.layer_lut = np.full(1 << 16, -1, np.int32)
        self.layer_lut[np.asarray(sel.layers, np.int64) & 0xFFFF] = np.arange(self.L, dtype=np.int32)
        # selected layers l0, l0 + 1, ... (every MoE layer of most models): a row's index is layer - l0
        first = int(sel.layers[0]) if sel.layers else 0
        self._layer_offset = first if list(sel.layers) == list(range(first, first + self.L)) else None
        self.model_lut: np.ndarray | None = None  # True at the manifest's MoE layers
        if sel.model_layers:
            self.model_lut = np.zeros(1 << 16, bool)
            self.model_lut[np.asarray(sel.model_layers, np.int64) & 0xFFFF] = True
        ids = sel.request_ids
        # index per request id: its position, -1 if its domain is left out, R if it is not listed.
        slot = np.where(sel.request_domain >= 0, np.arange(self.R), -1).astype(np.int32)
        self._dense = ids.size == 0 or (ids[0] >= 0 and ids[-1] < (1 << 24))
        if self._dense:
            size = int(ids[-1]) + 2 if ids.size else 1
            self.req_lut = np.full(size, self.R if sel.keep_unlisted else -1, np.int32)
            self.req_lut[ids] = slot
        self._slot = slot
        # per request index (R = not listed): its domain group (D for R) and request-sample slot.
        self.group = np.append(np.where(sel.request_domain >= 0, sel.request_domain, self.D), self.D).astype(np.int32)
        self.sample_slot = np.full(self.R + 1, -1, np.int32)
        self.sample_slot[sel.sampled] = np.arange(len(sel.sampled), dtype=np.int32)

    def request_slots(self, rid: np.ndarray) -> np.ndarray:
        unlisted = self.R if self.sel.keep_unlisted else -1
        if self._dense and rid.size and rid.min() >= 0 and rid.max() < self.req_lut.size - 1:
            return self.req_lut[rid]
        if self._dense:
            inside = (rid >= 0) & (rid < self.req_lut.size - 1)
            return np.where(inside, self.req_lut[np.where(inside, rid, self.req_lut.size - 1)], unlisted)
        pos = np.searchsorted(self.sel.request_ids, rid)
        pos_c = np.minimum(pos, max(self.R - 1, 0))
        found = (pos < self.R) & (self.sel.request_ids[pos_c] == rid) if self.R else np.zeros(rid.shape, bool)
        return np.where(found, self._slot[pos_c], unlisted).astype(np.int32)

    def empty_partial(self) -> Partial:
        return Partial(0, np.zeros((0, 2, self.L, self.E), np.int64), None, TokenSample.empty(self.k), 0,
                       np.zeros(2, bool))

    def _layer_index(self, layer: np.ndarray) -> np.ndarray:
        """``(n,)`` int32 index of each row's layer in the selection, -1 for a layer left out."""
        l0 = self._layer_offset
        if l0 is not None and layer.size:
            lo, hi = int(layer.min()), int(layer.max())
            if l0 <= lo and hi < l0 + self.L:  # every row's layer selected: a subtraction, not a lookup per row
                out = layer.astype(np.int32)
                out -= l0
                return out
        return self.layer_lut[layer.astype(np.int16, copy=False).view(np.uint16)]  # == layer & 0xFFFF

    def check_layers(self, layer: np.ndarray, where: str) -> None:
        """Raise if a row left out of the selection (``layer``, its layers) is of no MoE layer of the
        manifest: it would be dropped in silence, as rows of the layers --layers leaves out are."""
        if self.model_lut is None or not layer.size:
            return
        bad = layer[~self.model_lut[layer.astype(np.int16, copy=False).view(np.uint16)]]
        if bad.size:
            raise AnalysisError(
                f"{where}: layer {int(bad[0])} is not among the manifest's MoE layers "
                f"({format_ranges(self.sel.model_layers)}); the trace is inconsistent with its model"
            )

    def _seen(self, ri: np.ndarray, phase: np.ndarray, runs: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """``2 * request index + phase`` of every listed request and phase among the rows, sorted, unique."""
        if runs is not None:  # per run: which phases its rows hold (codes 0 and 1: their min and max)
            heads = runs[0]
            ri_u = ri[heads].astype(np.int64)
            listed = ri_u < self.R
            first = listed & (np.minimum.reduceat(phase, heads) == 0)
            second = listed & (np.maximum.reduceat(phase, heads) == 1)
            return np.unique(np.concatenate([ri_u[first] * 2, ri_u[second] * 2 + 1]))
        listed = ri < self.R
        if listed.all():
            code = ri.astype(np.int64) * 2 + phase
        else:
            code = ri[listed].astype(np.int64) * 2 + phase[listed]
        if not code.size:
            return np.zeros(0, np.int64)
        c0, c1 = int(code.min()), int(code.max())
        if c1 - c0 < 4 * code.size + 1024:
            return c0 + np.flatnonzero(np.bincount(code - c0, minlength=c1 - c0 + 1))
        return np.unique(code)

    def __call__(self, table: pa.Table, where: str) -> Partial:
        L, E, k, D = self.L, self.E, self.k, self.D
        n = table.num_rows
        rid = _np(table, "request_id")
        layer = _np(table, "layer")
        phase = _phase_codes(table.column("phase"), where)
        experts_col = table.column("experts").combine_chunks()
        experts = experts_col.flatten().to_numpy(zero_copy_only=False).reshape(n, k)
        # Rows in request order (as captures and imports write them) come in long runs of one request:
        # what depends on the request alone is looked up once a run, not once a row.
        runs = _runs_of(rid)
        if runs is None:
            ri = self.request_slots(rid)
        else:
            heads, length = runs
            ri = np.repeat(self.request_slots(rid[heads]), length)
        li = self._layer_index(layer)
        keep = (ri >= 0) & (li >= 0)
        if not keep.all():
            self.check_layers(layer[li < 0], where)
            sel_rows = np.flatnonzero(keep)
            rid, ri, li, phase, experts = (np.take(x, sel_rows, axis=0) for x in (rid, ri, li, phase, experts))
            runs = None
        else:
            sel_rows = None
        if ri.size == 0:
            return self.empty_partial()
        lo_e, hi_e = int(experts.min()), int(experts.max())
        if lo_e < 0 or hi_e >= E:
            bad = lo_e if lo_e < 0 else hi_e
            raise AnalysisError(
                f"{where}: expert id {bad} outside 0..{E - 1} (the manifest says {E} experts); "
                "the trace is inconsistent with its model"
            )
        # codes are 0 and 1 only (_phase_codes): their min and max tell which occur, without a bincount's
        # (n,) intp copy of the int8 codes (measured 3% of the counting's time at 10^8 rows)
        lo_p, hi_p = int(phase.min()), int(phase.max())
        phases_seen = np.array([lo_p == 0, hi_p == 1])
        # Step 1: counts. A row counts in its domain group (0..D) or, if its request is in the request
        # sample, in that request's bin (D + 1 + its local slot); the sampled bins are then added to
        # their domains. Bins are local to the sampled requests present, so they stay few; where
        # those requests have few rows each (dense bins would be mostly zeros), their counts are
        # kept sparse instead: (flat index, count) pairs.
        # Per run (or per row, without runs): the request-sample slot and the domain group.
        ri_u = ri if runs is None else ri[heads]
        si = self.sample_slot[ri_u]
        in_u = si >= 0
        bins = self.group[ri_u]
        per_req = 2 * L * E
        slots, lo, nslots, sparse = None, 0, 0, None
        if in_u.any():
            s_u = si[in_u]  # the slots, once per run
            rows_in = s_u.size if runs is None else int(length[in_u].sum())
            s0, s1 = int(s_u.min()), int(s_u.max())
            budget = 4 * rows_in * k + (1 << 16)  # dense bins allowed: a few per sampled route
            if (s1 - s0 + 1) * per_req <= budget:
                lo, local, nslots = s0, s_u - s0, s1 - s0 + 1
            else:
                slots = np.unique(s_u)
                local = np.searchsorted(slots, s_u)  # the index of each in slots, as np.unique's inverse
                nslots = slots.size
                if nslots * per_req > budget:
                    in_sample = in_u if runs is None else np.repeat(in_u, length)
                    s_in = s_u if runs is None else np.repeat(s_u, length[in_u])
                    sparse, slots, nslots = _sparse_counts(s_in, phase[in_sample], li[in_sample],
                                                           experts[in_sample], L, E), None, 0
            if nslots:
                bins[in_u] = D + 1 + local.reshape(-1)
        if runs is not None:
            bins = np.repeat(bins, length)
        base = ((bins.astype(np.int64) * 2 + phase) * L + li) * E
        size = (D + 1 + nslots) * per_req
        # Every slot's ids in one (k, n) array, built column by column from whole rows of n ids, and counted
        # by one bincount: a bincount per column allocated, zeroed and added up (size,) fresh bins k times,
        # about 2.6 MB each at 10^6 rows (measured: the pass 0.13 -> 0.12 s wall, 0.12 -> 0.10 s user).
        idx = np.empty((k, base.size), np.int64)
        np.add(base, experts.T, out=idx)
        counts = np.bincount(idx.reshape(-1), minlength=size).astype(np.int64, copy=False)
        counts = counts.reshape(D + 1 + nslots, 2, L, E)
        domains, sampled = counts[: D + 1], counts[D + 1 :]
        if nslots:
            req = (np.arange(lo, lo + nslots) if slots is None else slots)
            groups = self.group[self.sel.sampled[req]]
            # each request's bins into its group's, in place: selecting a group's requests copied their
            # bins (measured 10x slower at 6 requests a batch, and no faster at 600)
            for slot, g in enumerate(groups):
                domains[g] += sampled[slot]
        # Step 2: which listed requests have rows of each phase (2 * index + phase, sorted, unique).
        seen = self._seen(ri, phase, runs)
        # Step 3: the sample: rows whose token (or forward pass) hashes below the threshold.
        step = _np(table, "step")
        pos = _np(table, "pos")
        if sel_rows is not None:
            step, pos = step[sel_rows], pos[sel_rows]
        if self.use_batch_id:
            bid = table.column("batch_id").combine_chunks().fill_null(-1).to_numpy(zero_copy_only=False)
            if sel_rows is not None:
                bid = bid[sel_rows]
            h = splitmix64(bid.astype(np.uint64) ^ self.seed, copy=False)
            if self.threshold is not None:
                take = np.flatnonzero(h < self.threshold)
                # np.take: along the first axis of (n, k) experts it copies rows several times faster than [take]
                h, rid, step, pos, li, experts = (np.take(x, take, axis=0) for x in (h, rid, step, pos, li, experts))
            token = _token_key(rid, step, pos)
        else:
            token = _token_key(rid, step, pos)
            h = splitmix64(token ^ self.seed, copy=False)
            if self.threshold is not None:
                take = np.flatnonzero(h < self.threshold)
                h, token, li, experts = (np.take(x, take, axis=0) for x in (h, token, li, experts))
        sample = TokenSample(h, token, li.astype(np.int16), experts.astype(np.int16, copy=False))
        part = Partial(lo, np.ascontiguousarray(sampled), slots, sample, int(ri.size), phases_seen,
                       np.ascontiguousarray(domains), seen)
        if sparse is not None:
            part.keys, part.values = sparse
        return part


def _runs_of(rid: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(heads, lengths)`` of the runs of equal values of ``rid``, or None when runs are short
    (fewer than 8 rows on average: looking up once a run would not pay for finding the runs)."""
    n = rid.size
    if n == 0:
        return None
    new = np.empty(n, bool)
    new[0] = True
    np.not_equal(rid[1:], rid[:-1], out=new[1:])
    heads = np.flatnonzero(new)
    if heads.size * 8 > n:
        return None
    return heads, np.diff(heads, append=n)


def _sparse_counts(slot: np.ndarray, phase: np.ndarray, layer: np.ndarray, experts: np.ndarray,
                   L: int, E: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of rows ``(slot, phase, layer, experts (n, k))`` as sorted unique flat indices into
    ``(S, 2, L, E)`` and their counts (int64)."""
    base = ((slot.astype(np.int64) * 2 + phase) * L + layer) * E
    keys, values = np.unique((base[:, None] + experts).reshape(-1), return_counts=True)
    return keys, values.astype(np.int64)


def _token_key(rid: np.ndarray, step: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``(n,)`` uint64 identity of a token: a hash of (request_id, step, pos)."""
    with np.errstate(over="ignore"):
        key = rid.astype(np.uint64)
        key *= np.uint64(0x9E3779B97F4A7C15)
        high = step.astype(np.uint64)
        high <<= np.uint64(32)
        high |= pos.astype(np.uint32)
        key ^= high
    return splitmix64(key, copy=False)


def _np(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().to_numpy(zero_copy_only=False)


def _phase_codes(col: pa.ChunkedArray, where: str) -> np.ndarray:
    """``(n,)`` int8: 0 prefill, 1 decode, whatever dictionary order the file uses."""
    out = []
    for chunk in col.chunks:
        if pa.types.is_dictionary(chunk.type):
            values = chunk.dictionary.to_pylist()
            indices = chunk.indices.to_numpy(zero_copy_only=False)
        else:
            values, indices = np.unique(chunk.to_numpy(zero_copy_only=False), return_inverse=True)
            values = list(values)
        try:
            remap = np.array([PHASES.index(v) for v in values], np.int8) if values else np.zeros(0, np.int8)
        except ValueError:
            raise AnalysisError(f"{where}: phase values {values} are not {PHASES}") from None
        if len(values) and indices.dtype.kind in "iu" and np.array_equal(remap, np.arange(len(values))):
            out.append(indices.astype(np.int8))  # the file's order is ours: the same codes, 20x cheaper than a gather
        else:
            out.append(remap[indices] if len(values) else np.zeros(len(indices), np.int8))
    return np.concatenate(out) if out else np.zeros(0, np.int8)


ROUTING_COLUMNS = ["request_id", "step", "phase", "pos", "layer", "experts"]


def row_groups(trace: Trace) -> list[tuple[Path, int]]:
    """Units of work: (shard path, row group index), in trace order."""
    units = []
    for path in trace.shard_paths("routing"):
        for i in range(parquet_file(path).num_row_groups):
            units.append((path, i))
    return units


def plan_routing(trace: Trace, sel: Selection, rows_total: int) -> tuple[Aggregates, _Pass, list[str]]:
    """What every engine shares before the pass: the empty :class:`Aggregates`, the per-row-group
    work (sample threshold and key fixed from ``rows_total``) and the columns to read."""
    use_batch_id = trace.manifest.has("batch_id") and _has_batch_ids(trace)
    n_moe = max(1, len(trace.model.moe_layers))
    tokens_est = max(1, rows_total // n_moe)
    fraction = min(1.0, 1.25 * sel.sample_tokens / tokens_est) if sel.sample_tokens > 0 else 1.0
    threshold = None if fraction >= 1.0 else np.uint64(int(fraction * float(1 << 64)))
    work = _Pass(sel, threshold, use_batch_id)
    agg = Aggregates.empty(sel, tokens_estimate=tokens_est, sample_fraction=fraction,
                           sample_key="batch_id" if use_batch_id else "token")
    return agg, work, ROUTING_COLUMNS + (["batch_id"] if use_batch_id else [])


def aggregate_routing(
    trace: Trace,
    sel: Selection,
    *,
    units: Sequence[tuple[Path, int]] | None = None,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Aggregates:
    """One streaming pass over ``units`` (default: every row group of the trace) -> :class:`Aggregates`.

    Row groups are read and counted on a pool of ``threads`` threads (default: CPU count); pyarrow
    decodes without the GIL, so reading one row group overlaps counting another. Each is read in
    batches of :data:`MIN_SLICE_ROWS` rows whose :class:`Partial` is merged into the result as soon as
    it is done, so at most a few batches per thread are held at once.
    """
    units = list(units) if units is not None else row_groups(trace)
    rows_total = sum(parquet_file(p).metadata.row_group(i).num_rows for p, i in units)
    agg, work, columns = plan_routing(trace, sel, rows_total)
    lock = threading.Lock()
    shards = ShardReader(trace, units)  # each shard read and sha256-checked once, as it is counted

    def merge(part: Partial) -> None:
        with lock:
            agg.merge(part)

    def run(unit: tuple[Path, int]) -> None:
        path, i = unit
        where = f"{path} (row group {i})"
        # The row group in batches of MIN_SLICE_ROWS rows (partials merge by sum): each batch's buffers
        # are reused for the next. With fewer row groups than threads, batches are counted on `pieces`
        # threads while this one decodes the next (pyarrow and numpy both release the GIL).
        batches = shards.iter_row_group(path, i, columns, MIN_SLICE_ROWS)
        inner = ThreadPoolExecutor(max_workers=pieces, thread_name_prefix="moeprof-slice") if pieces > 1 else None
        jobs: list = []
        try:
            while True:
                try:
                    table = next(batches, None)
                except (pa.ArrowException, OSError) as exc:  # footer fine, pages not: a corrupt shard
                    raise TraceIntegrityError(f"{path} (row group {i}): cannot be decoded ({exc}); the shard is corrupt") from None
                if table is None:
                    break
                if inner is None:
                    merge(work(table, where))
                    continue
                jobs.append(inner.submit(work, table, where))
                while len(jobs) > pieces:  # at most `pieces` batches decoded ahead of their counting
                    merge(jobs.pop(0).result())
            for job in jobs:
                merge(job.result())
        finally:
            batches.close()
            if inner is not None:
                inner.shutdown(wait=True, cancel_futures=True)
        if progress is not None:
            progress(1)

    threads = threads or os.cpu_count() or 1
    pieces = max(1, min(threads // max(1, len(units)), rows_total // max(1, len(units)) // MIN_SLICE_ROWS))
    if threads == 1 or len(units) <= 1:
        for u in units:
            run(u)
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moeprof-analyze") as pool:
            for fut in [pool.submit(run, u) for u in units]:
                fut.result()
    return agg


def _has_batch_ids(trace: Trace) -> bool:
    """True if the routing shards carry a non-null ``batch_id`` (checked from Parquet statistics)."""
    for path in trace.shard_paths("routing"):
        meta = parquet_file(path).metadata
        col = meta.schema.names.index("batch_id") if "batch_id" in meta.schema.names else -1
        if col < 0:
            return False
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(col).statistics
            if stats is None or stats.null_count is None:
                return True  # cannot tell from the footer: assume present
            if stats.null_count < meta.row_group(i).num_rows:
                return True
        return False
    return False


def aggregate_loads(trace: Trace, sel: Selection) -> Aggregates:
    """Aggregates of a count-only trace (``loads/``): counts per request/phase where the table has them."""
    import polars as pl

    frame = trace.loads()
    L, E = len(sel.layers), sel.num_experts
    agg = Aggregates.empty(sel, per_token=False)
    if frame is None:
        return agg
    table = (
        frame.with_columns(pl.col("phase").cast(pl.String))
        .group_by(["window", "phase", "layer", "expert", "request_id", "domain"])
        .agg(pl.col("count").sum())
        .collect()
    )
    if table.height == 0:
        return agg
    where = f"{trace.path}/loads"
    work = _Pass(sel, None, False)
    layer_i = work.layer_lut[table["layer"].to_numpy().astype(np.int64) & 0xFFFF]
    work.check_layers(table["layer"].to_numpy()[layer_i < 0], where)
    expert = table["expert"].to_numpy().astype(np.int64)
    if expert.min() < 0 or expert.max() >= E:
        raise AnalysisError(f"{where}: expert id outside 0..{E - 1} (the manifest says {E} experts)")
    phase_str = table["phase"].to_list()
    phase = np.array([0 if p in (None, "prefill") else 1 for p in phase_str], np.int64)
    agg.phases_seen[np.unique(phase[[p is not None for p in phase_str]])] = True
    rid = table["request_id"].fill_null(-1).to_numpy()
    cnt = table["count"].to_numpy().astype(np.int64)
    slot = np.where(rid >= 0, work.request_slots(rid), len(sel.request_ids) if sel.keep_unlisted else -1)
    # Count rows with a domain but no request id count for their domain (and the totals).
    dom_lut = {d: i for i, d in enumerate(sel.domains)}
    dom = np.array([dom_lut.get(d, -2) if d is not None else -1 for d in table["domain"].to_list()], np.int64)
    by_domain_only = (rid < 0) & (dom != -1)
    keep = (layer_i >= 0) & (slot >= 0) & ~by_domain_only
    slot_k, phase_k, layer_k, expert_k, cnt_k = slot[keep], phase[keep], layer_i[keep], expert[keep], cnt[keep]
    np.add.at(agg.domains, (work.group[slot_k], phase_k, layer_k, expert_k), cnt_k)
    sampled = work.sample_slot[slot_k]
    s = sampled >= 0
    np.add.at(agg.sampled, (sampled[s], phase_k[s], layer_k[s], expert_k[s]), cnt_k[s].astype(np.int32))
    listed = (slot_k < len(sel.request_ids)) & (cnt_k > 0)
    agg.seen[slot_k[listed], phase_k[listed]] = True
    extra = by_domain_only & (dom >= 0) & (layer_i >= 0)
    if extra.any():
        agg.domain_extra = np.zeros((len(sel.domains), 2, L, E), np.int64)
        np.add.at(agg.domain_extra, (dom[extra], phase[extra], layer_i[extra], expert[extra]), cnt[extra])
    keep |= extra
    agg.rows = int(keep.sum())
    # windows: counts per window, for imbalance over the source's own windows.
    win = table["window"].to_numpy()
    uniq, inv = np.unique(win[keep], return_inverse=True)
    windows = np.zeros((uniq.size, L, E), np.int64)
    np.add.at(windows, (inv, layer_i[keep], expert[keep]), cnt[keep])
    agg.windows = windows
    return agg
