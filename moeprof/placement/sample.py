"""What ``place`` and ``simulate`` read of a trace, within a budget: a request sample, read in shard tasks.

A placement is fitted on per-request counts (``[L, E]`` per phase, 119 KB a request at DeepSeek-V3's
58 × 256) and scored on token rows (one per token and MoE layer). Reading every request's would cost
the driver about 240 B per routing row; at 10^10 rows nothing holds that. So the driver keeps them
for a bounded request sample only, and a budget sets its size, not the trace:

1. The split into train and held-out requests is over every request of the trace
   (:func:`~moeprof.placement.data.split_requests`, seeded), as before.
2. The sample: the ``max_requests`` requests with the smallest ``(splitmix64 hash of (seed, request
   id), request id)``, the bottom-k rule of ``analyze --sample-requests``
   (:func:`moeprof.analysis.aggregate.sample_requests`), then, in that hash order, the longest
   prefix whose token rows of the simulated phase fit ``max_rows`` (counted in a first pass that
   reads two columns, only when the trace holds more rows than the budget). A trace under both
   budgets is read whole: the sample is every request and every result is what it was before.
3. One task per routing shard (:mod:`moeprof.analysis.engine`: local threads or Ray) reads the
   shard, checks its sha256, and returns the counts and token rows of the sampled requests in it
   and the per-expert token-routes of the train and the held-out split over *all* its rows (a
   ``[2, 2, L, E]`` sum: EPLB's input is exact at any scale). Parts merge by addition and by
   joining lists of row chunks, restored to shard order at the end, so the rows come out in the
   trace's order and the result does not depend on the engine.

The manifest records each shard's request-id range (``TraceWriter`` does for every routing shard;
with ``request_shards=True``, as the synthetic generator and the benchmark traces write, a request's
rows stay in one shard, so the ranges do not overlap). A shard task keeps its counts over the sample
slots of its range only, and when only the sample is needed (``simulate --placement``) shards whose
range holds no sampled request are not read at all. Captures of interleaved requests give wide,
overlapping ranges: correct, only less pruned.

Since both budgets and the seed fix the sample, ``place`` records them in ``placement.json``
(``fit.sample``, with a digest of the held-out sample's ids) and ``simulate --placement`` draws the
same sample and checks it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from moeprof.errors import PlacementError, TraceIntegrityError, UsageError
from moeprof.trace.reader import Trace
from moeprof.trace.schema import UNLABELLED

DEFAULT_SAMPLE_ROWS = 1 << 23
"""Token rows of the simulated phase the driver holds at most (8,388,608; 96 B each at top-8: 0.8 GB)."""

SAMPLE_RULE = "bottom-k by splitmix64(seed, request id), then the longest prefix in that order within max_rows"
ROUTING_COLUMNS = ["request_id", "step", "phase", "pos", "layer", "experts"]


def default_sample_requests() -> int:
    from moeprof.analysis.aggregate import DEFAULT_SAMPLE_REQUESTS

    return DEFAULT_SAMPLE_REQUESTS


def check_budget(sample_requests: Any, sample_rows: Any) -> tuple[int, int]:
    """The two budgets as ints, or a :class:`UsageError` naming the option."""
    out = []
    for name, value, what in (("--sample-requests", sample_requests, "requests whose own counts are kept"),
                              ("--sample-rows", sample_rows, "token rows of the simulated phase held")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UsageError(f"{name} must be a whole number of at least 1, got {value!r} ({what}; "
                             f"e.g. {name} {default_sample_requests() if 'requests' in name else DEFAULT_SAMPLE_ROWS})")
        out.append(int(value))
    return out[0], out[1]


@dataclass
class RequestSample:
    """The requests a placement reads. ``index`` and ``held_out`` are over the sample (sorted by id)."""

    request_ids: np.ndarray  # [R] int64, every request of the trace, sorted
    domains: np.ndarray  # [R] str
    held_out_all: np.ndarray  # [R] bool, the split over every request
    index: np.ndarray  # [S] sorted indices into request_ids
    seed: int
    max_requests: int
    max_rows: int
    limited_by: str | None = None  # None, "--sample-requests" or "--sample-rows"
    requests_sha256: str = ""
    stats: dict[str, Any] = field(default_factory=dict)  # filled as the shards are read

    @property
    def ids(self) -> np.ndarray:
        return self.request_ids[self.index]

    @property
    def held_out(self) -> np.ndarray:
        return self.held_out_all[self.index]

    @property
    def complete(self) -> bool:
        return len(self.index) == len(self.request_ids)

    def record(self) -> dict[str, Any]:
        """What ``placement.json`` keeps (``fit.sample``) so that ``simulate`` can redraw and check it."""
        held = self.held_out
        return dict(
            rule=SAMPLE_RULE, seed=int(self.seed), max_requests=self.max_requests, max_rows=self.max_rows,
            requests_in_trace=int(len(self.request_ids)), held_out_in_trace=int(self.held_out_all.sum()),
            sampled_requests=int(len(self.index)), train_requests=int((~held).sum()), test_requests=int(held.sum()),
            complete=self.complete, limited_by=self.limited_by,
            test_ids_sha256=ids_digest(self.ids[held]),
            **self.stats,
        )


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def _hash_order(ids: np.ndarray, seed: int) -> np.ndarray:
    from moeprof.analysis.aggregate import hash_order

    return hash_order(ids, seed)


def _shard_items(trace: Trace, wanted: np.ndarray | None) -> list[tuple[str, str, int, list[int] | None]]:
    """``(location, sha256, shard ordinal, request-id range)`` of the routing shards that may hold a
    ``wanted`` request (sorted ids; None: every shard), by the range the manifest records for each."""
    items = []
    for i, (path, shard) in enumerate(zip(trace.shard_paths("routing"), trace.manifest.shards_of("routing"))):
        rng = shard.request_ids
        if wanted is not None and rng is not None:
            lo, hi = np.searchsorted(wanted, rng[0], "left"), np.searchsorted(wanted, rng[1], "right")
            if lo == hi:
                continue
        items.append((str(path), shard.sha256, i, rng))
    return items


BATCH_ROWS = 1 << 16
"""Rows a shard task decodes at a time: its temporaries (about 0.5 KB a row at top-8) stay small
whatever the writer's row-group size."""


def read_shard(location: str, sha256: str, columns: list[str]):
    """Batches of ``BATCH_ROWS`` rows of a routing shard as polars frames, from bytes checked against
    the manifest."""
    import pyarrow as pa

    from moeprof.trace.fs import checked_parquet

    pf = checked_parquet(location, sha256)
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False):
            yield pl.from_arrow(batch)
    except (pa.ArrowException, OSError) as exc:
        raise TraceIntegrityError(f"{location}: not a readable Parquet file ({exc}); the shard is corrupt") from None


# -- pass 1: which requests there are and how many rows each has ---------------------------------------
def _census_shard(item: tuple, shared: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Sorted request ids of the shard's rows (of ``candidates`` only, when given) and their rows of
    the simulated phase."""
    candidates, phase = shared
    keys, values = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for frame in read_shard(item[0], item[1], ["request_id", "phase"]):
        rid = frame["request_id"].to_numpy().astype(np.int64)
        sim = (frame["phase"].cast(pl.String) == phase).to_numpy()
        if candidates is not None:
            pos = np.clip(np.searchsorted(candidates, rid), 0, max(len(candidates) - 1, 0))
            keep = candidates[pos] == rid if len(candidates) else np.zeros(len(rid), bool)
            rid, sim = rid[keep], sim[keep]
        u, inv = np.unique(rid, return_inverse=True)
        keys.append(u)
        values.append(np.bincount(inv.reshape(-1), weights=sim, minlength=len(u)).astype(np.int64))
    return _sum_by_key(keys, values)


def _sum_by_key(keys: list[np.ndarray], values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    from moeprof.analysis.shards import sum_by_key

    return sum_by_key(keys, values)


def _merge_census(a: tuple, b: tuple) -> tuple[np.ndarray, np.ndarray]:
    return _sum_by_key([a[0], b[0]], [a[1], b[1]])


def plan_sample(trace: Trace, *, phase: str = "decode", seed: int = 0, held_out: Any = None,
                max_requests: int | None = None, max_rows: int | None = None, engine: Any = None) -> RequestSample:
    """Choose the request sample (module docstring). ``held_out(R) -> [R] bool`` gives the split over
    every request (None: every request held out, as when scoring a placement fitted elsewhere)."""
    from moeprof.analysis.engine import get_engine

    max_requests, max_rows = check_budget(default_sample_requests() if max_requests is None else max_requests,
                                          DEFAULT_SAMPLE_ROWS if max_rows is None else max_rows)
    engine = get_engine(engine)
    if not trace.manifest.shards_of("routing"):
        raise PlacementError(
            f"{trace.path}: the trace has no per-token routing rows (source {trace.manifest.source!r}); "
            "place and simulate need a trace from `moeprof capture` or a per-token import"
        )
    req = trace.requests().sort("request_id")
    census = None
    from_rows = req.height == 0
    if from_rows:  # an import without a request list: the ids come from the rows
        census = engine.map_reduce(_census_shard, _shard_items(trace, None), _merge_census, (None, phase))
        req = pl.DataFrame({"request_id": census[0], "domain": [UNLABELLED] * len(census[0])})
    ids = req["request_id"].to_numpy().astype(np.int64)
    domains = np.asarray(req["domain"].to_list(), dtype=object)
    R = len(ids)
    held = np.ones(R, dtype=bool) if held_out is None else held_out(R)
    order = _hash_order(ids, seed)
    cand = order[:max_requests]
    limited = "--sample-requests" if R > max_requests else None
    if trace.num_routing_rows > max_rows:  # the budget may bind: count the candidates' rows
        cand_ids = np.sort(ids[cand])
        if census is None:
            census = engine.map_reduce(_census_shard, _shard_items(trace, cand_ids), _merge_census, (cand_ids, phase))
        per = np.zeros(R, np.int64)
        if census is not None and len(census[0]):
            at = np.searchsorted(ids, census[0])
            per[at] = census[1]
        cum = np.cumsum(per[cand])
        fit = int(np.searchsorted(cum, max_rows, "right"))
        if fit < len(cand):
            if fit == 0:
                raise PlacementError(
                    f"--sample-rows {max_rows}: the first request of the sample (request {int(ids[cand[0]])}) alone "
                    f"has {int(per[cand[0]]):,} {phase} rows; raise --sample-rows")
            cand, limited = cand[:fit], "--sample-rows"
    shards = trace.manifest.shards_of("requests")
    # an empty request list is the same file in every trace: then the ids from the rows tell traces apart
    sha = shards[0].sha256 if shards and not from_rows else hashlib.sha256(ids.tobytes()).hexdigest()
    return RequestSample(ids, domains, held, np.sort(cand).astype(np.int64), int(seed), max_requests, max_rows,
                         limited, sha)


def check_sides(sample: RequestSample, test_fraction: float) -> None:
    """A fit needs train and held-out requests in the sample: say which option to raise when not."""
    held = sample.held_out
    if not sample.complete and (len(held) < 2 or held.all() or not held.any()):
        side = "held-out" if not held.any() else "train"
        raise PlacementError(
            f"the request sample ({len(held)} of {len(sample.request_ids)} requests: --sample-requests "
            f"{sample.max_requests}, --sample-rows {sample.max_rows}) holds no {side} request at --test-fraction "
            f"{test_fraction}; raise --sample-requests or --sample-rows")


# -- pass 2: the sample's counts and rows, the splits' loads ------------------------------------------
@dataclass
class _Shared:
    all_ids: np.ndarray  # [R] sorted
    held_all: np.ndarray  # [R] bool
    slot: np.ndarray  # [R] int64: position in the sample, -1 outside it
    sample_ids: np.ndarray  # [S] sorted
    layer_index: np.ndarray
    L: int
    E: int
    k: int
    phase: str
    totals: bool
    trace: str

    @property
    def per_request(self) -> int:
        return 2 * self.L * self.E


def _gather_shard(item: tuple[str, str, int, Any], s: _Shared) -> dict[str, Any]:
    """One shard's part: the counts of its sampled requests as one dense block over the sample slots
    its request-id range spans (``[lo, hi)``; a request-major shard spans few), its sampled rows of
    the simulated phase as chunks tagged with their place in the trace, the splits' totals."""
    location, sha, ordinal, rng = item
    lo, hi = (0, len(s.sample_ids)) if rng is None else (int(np.searchsorted(s.sample_ids, rng[0], "left")),
                                                          int(np.searchsorted(s.sample_ids, rng[1], "right")))
    block = np.zeros((hi - lo) * s.per_request, np.int32)
    chunks = []
    totals = np.zeros(4 * s.L * s.E, np.int64) if s.totals else None
    rows = 0
    for g, frame in enumerate(read_shard(location, sha, ROUTING_COLUMNS)):
        rows += frame.height
        rid = frame["request_id"].to_numpy().astype(np.int64)
        r = np.clip(np.searchsorted(s.all_ids, rid), 0, len(s.all_ids) - 1)
        if len(rid) and not np.array_equal(s.all_ids[r], rid):
            raise PlacementError(f"{s.trace}: routing rows name requests that requests.parquet does not list "
                                 f"(in {location})")
        raw = frame["layer"].to_numpy().astype(np.int64)
        if len(raw) and (raw.min() < 0 or raw.max() >= len(s.layer_index) or (s.layer_index[raw] < 0).any()):
            raise PlacementError(f"{s.trace}: routing rows name layers outside manifest.model.moe_layers "
                                 f"{np.flatnonzero(s.layer_index >= 0).tolist()} (in {location})")
        li = s.layer_index[raw]
        experts = frame["experts"].to_numpy().astype(np.int64).reshape(-1, s.k)
        is_prefill = (frame["phase"].cast(pl.String) == "prefill").to_numpy()
        if totals is not None:  # [split (train, held out), phase (prefill, decode), L, E] over every row
            base = (s.held_all[r].astype(np.int64) * 2 + ~is_prefill) * s.L + li
            totals += np.bincount((base[:, None] * s.E + experts).ravel(), minlength=len(totals))
        slot = s.slot[r]
        m = slot >= 0
        if not m.any():
            continue
        if slot[m].min() < lo or slot[m].max() >= hi:
            raise TraceIntegrityError(f"{location}: holds rows of requests outside the request-id range "
                                      f"{rng} the manifest records for it")
        base = ((slot[m] - lo) * 2 + ~is_prefill[m]) * s.L + li[m]
        u, c = np.unique((base[:, None] * s.E + experts[m]).ravel(), return_counts=True)
        block[u] += c.astype(np.int32)
        sim = m & (is_prefill if s.phase == "prefill" else ~is_prefill)
        if sim.any():
            chunks.append(((ordinal, g), slot[sim], frame["step"].to_numpy()[sim].astype(np.int64),
                           frame["pos"].to_numpy()[sim].astype(np.int64), li[sim], experts[sim]))
    return dict(lo=lo, counts=block, chunks=chunks, totals=totals, shards=1, rows_read=rows)


def _merge_gathered(a: dict[str, Any], b: dict[str, Any], per_request: int, size: int) -> dict[str, Any]:
    """Both parts as one: counts added over the union of their slot ranges, row chunks joined
    (ordered once at the end), totals added. Integer sums: the order of merges changes nothing."""
    lo_a, lo_b = a["lo"], b["lo"]
    hi_a, hi_b = lo_a + len(a["counts"]) // per_request, lo_b + len(b["counts"]) // per_request
    if hi_b == lo_b:
        lo, counts = lo_a, a["counts"]
    elif hi_a == lo_a:
        lo, counts = lo_b, b["counts"]
    else:
        lo, hi = min(lo_a, lo_b), max(hi_a, hi_b)
        if a["counts"].flags.writeable and (lo, hi) != (lo_a, hi_a):
            lo, hi = 0, size  # local threads: one accumulator over the whole sample, grown once
        if (lo, hi) == (lo_a, hi_a) and a["counts"].flags.writeable:  # the accumulator (local threads)
            counts = a["counts"]
        else:  # Ray hands tasks read-only arrays: a block over the union of both ranges
            counts = np.zeros((hi - lo) * per_request, np.int32)
            counts[(lo_a - lo) * per_request:(hi_a - lo) * per_request] += a["counts"]
        counts[(lo_b - lo) * per_request:(hi_b - lo) * per_request] += b["counts"]
    return dict(lo=lo, counts=counts, chunks=a["chunks"] + b["chunks"], shards=a["shards"] + b["shards"],
                rows_read=a["rows_read"] + b["rows_read"],
                totals=None if a["totals"] is None else a["totals"] + b["totals"])


class _Merger:
    """The merge with its block width, picklable for Ray's merge tasks."""

    def __init__(self, per_request: int, size: int) -> None:
        self.per_request, self.size = per_request, size

    def __call__(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return _merge_gathered(a, b, self.per_request, self.size)


@dataclass
class Gathered:
    prefill: np.ndarray  # [S, L, E] int32
    decode: np.ndarray  # [S, L, E] int32
    request: np.ndarray  # [n] sample index of each simulated-phase row, in trace order
    step: np.ndarray
    pos: np.ndarray
    layer: np.ndarray
    experts: np.ndarray  # [n, k]
    totals: np.ndarray | None  # [2 (train, held out), 2 (prefill, decode), L, E] int64 over every row
    shards_read: int
    rows_read: int


def gather(trace: Trace, sample: RequestSample, *, phase: str, engine: Any = None, totals: bool = True) -> Gathered:
    """Pass 2 (module docstring): one task per routing shard on ``engine``; ``totals`` reads every
    shard for the splits' per-expert loads, else only shards that may hold a sampled request."""
    from moeprof.analysis.engine import get_engine

    engine = get_engine(engine)
    model = trace.model
    layers = list(model.moe_layers)
    L, E, k = len(layers), model.num_experts, model.top_k
    layer_index = np.full(max(layers) + 1 if layers else 1, -1, dtype=np.int64)
    layer_index[layers] = np.arange(L)
    R, S = len(sample.request_ids), len(sample.index)
    slot = np.full(R, -1, np.int64)
    slot[sample.index] = np.arange(S)
    shared = _Shared(sample.request_ids, sample.held_out_all, slot, sample.ids, layer_index, L, E, k, phase, totals,
                     str(trace.path))
    items = _shard_items(trace, None if totals or sample.complete else sample.ids)
    per_request = 2 * L * E
    part = engine.map_reduce(_gather_shard, items, _Merger(per_request, S), shared)
    counts = np.zeros(S * per_request, np.int32)
    if part is not None and len(part["counts"]):
        if part["lo"] == 0 and len(part["counts"]) == len(counts):
            counts = part["counts"] if part["counts"].flags.writeable else part["counts"].copy()
        else:
            counts[part["lo"] * per_request:part["lo"] * per_request + len(part["counts"])] = part["counts"]
    if part is None:
        part = dict(chunks=[], totals=np.zeros(4 * L * E, np.int64) if totals else None, shards=0, rows_read=0)
    counts = counts.reshape(S, 2, L, E)
    chunks = sorted(part["chunks"], key=lambda c: c[0])  # shard order, then batch order: the trace's
    cols = [np.concatenate([c[i] for c in chunks]) if chunks else np.empty(0, np.int64) for i in range(1, 5)]
    experts = np.concatenate([c[5] for c in chunks]) if chunks else np.empty((0, k), np.int64)
    tot = part["totals"].reshape(2, 2, L, E) if part["totals"] is not None else None
    return Gathered(counts[:, 0], counts[:, 1], *cols, experts, tot, part["shards"], part["rows_read"])
