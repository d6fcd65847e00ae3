"""What placement and simulation read from a trace: per-request counts and per-token expert sets.

Kept small on purpose (``moeprof.analysis`` has the full statistics). Shapes, with R requests, L MoE
layers (in ``manifest.model.moe_layers`` order), E experts, k experts per token, n routing rows of
one phase:

* ``RoutingData.prefill`` / ``.decode``: ``[R, L, E]`` token-routes per request, layer and expert;
* ``TokenRows``: one row per (token, layer) of the simulated phase: ``request[n]`` (index into the
  requests), ``step[n]``, ``token[n]`` (a dense token index), ``layer[n]`` (MoE ordinal) and
  ``experts[n, k]``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import polars as pl

from moeprof.errors import PlacementError
from moeprof.trace.manifest import ModelInfo
from moeprof.trace.reader import Trace


@dataclass
class TokenRows:
    request: np.ndarray
    step: np.ndarray
    token: np.ndarray
    layer: np.ndarray
    experts: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.token.max()) + 1 if len(self.token) else 0

    def subset(self, keep_request: np.ndarray) -> "TokenRows":
        """Rows of the requests where ``keep_request[R]`` is true, tokens renumbered densely."""
        m = keep_request[self.request]
        tok = self.token[m]
        _, dense = np.unique(tok, return_inverse=True)
        return TokenRows(self.request[m], self.step[m], dense.astype(np.int64), self.layer[m], self.experts[m])


@dataclass
class RoutingData:
    model: ModelInfo
    request_ids: np.ndarray  # [R] int64
    domains: np.ndarray  # [R] str
    prefill: np.ndarray  # [R, L, E] int32
    decode: np.ndarray  # [R, L, E] int32
    rows: TokenRows  # the simulated phase
    phase: str
    requests_sha256: str

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    def counts(self, phase: str) -> np.ndarray:
        return self.prefill if phase == "prefill" else self.decode


ROUTING_COLUMNS = ["request_id", "step", "phase", "pos", "layer", "experts"]


def _read_shard(item: tuple[str], columns: list[str]) -> "pa.Table":
    """One routing shard's columns, read where the engine runs it (a thread or a Ray worker)."""
    from moeprof.trace.fs import read_table

    return read_table(item[0], columns)


def load_routing(trace: Trace, phase: str = "decode", engine=None) -> RoutingData:
    """Read the counts and token rows a placement needs from ``trace``; ``phase`` is the one simulated.

    With a non-local ``engine`` (:mod:`moeprof.analysis.engine`) each shard is read and decoded by a
    task of its own, where it runs; the rows come back in shard order, so the result is the same."""
    model = trace.model
    if not trace.manifest.shards_of("routing"):
        raise PlacementError(
            f"{trace.path}: the trace has no per-token routing rows (source {trace.manifest.source!r}); "
            "place and simulate need a trace from `moeprof capture` or a per-token import"
        )
    layers = list(model.moe_layers)
    L, E, k = len(layers), model.num_experts, model.top_k
    req = trace.requests().sort("request_id")
    if engine is None or engine.name == "local":
        frame = trace.routing(ROUTING_COLUMNS).collect()
    else:
        import pyarrow as pa

        items = [(str(p),) for p in trace.shard_paths("routing")]
        frame = pl.from_arrow(pa.concat_tables(engine.map(_read_shard, items, ROUTING_COLUMNS)))
    if req.height == 0:
        ids = np.unique(frame["request_id"].to_numpy())
        req = pl.DataFrame({"request_id": ids, "domain": ["unknown"] * len(ids)})
    request_ids = req["request_id"].to_numpy().astype(np.int64)
    domains = np.asarray(req["domain"].to_list(), dtype=object)
    r = np.searchsorted(request_ids, frame["request_id"].to_numpy())
    r = np.clip(r, 0, len(request_ids) - 1)
    if len(frame) and not np.array_equal(request_ids[r], frame["request_id"].to_numpy()):
        raise PlacementError(f"{trace.path}: routing rows name requests that requests.parquet does not list")
    layer_index = np.full(max(layers) + 1 if layers else 1, -1, dtype=np.int64)
    layer_index[layers] = np.arange(L)
    raw_layer = frame["layer"].to_numpy().astype(np.int64)
    if len(raw_layer) and (raw_layer.max() >= len(layer_index) or (layer_index[raw_layer] < 0).any()):
        raise PlacementError(f"{trace.path}: routing rows name layers outside manifest.model.moe_layers {layers}")
    li = layer_index[raw_layer]
    experts = frame["experts"].to_numpy().astype(np.int64).reshape(-1, k)
    is_prefill = (frame["phase"].cast(pl.String) == "prefill").to_numpy()

    def count(mask: np.ndarray) -> np.ndarray:
        idx = ((r[mask] * L + li[mask])[:, None] * E + experts[mask]).ravel()
        return np.bincount(idx, minlength=len(request_ids) * L * E).astype(np.int32).reshape(len(request_ids), L, E)

    prefill, decode = count(is_prefill), count(~is_prefill)
    sim = is_prefill if phase == "prefill" else ~is_prefill
    step = frame["step"].to_numpy()[sim].astype(np.int64)
    pos = frame["pos"].to_numpy()[sim].astype(np.int64)
    rs = r[sim]
    key = (rs * (int(step.max(initial=0)) + 1) + step) * (int(pos.max(initial=0)) + 1) + pos
    _, token = np.unique(key, return_inverse=True)
    rows = TokenRows(rs, step, token.astype(np.int64), li[sim], experts[sim])
    sha = ""
    shards = trace.manifest.shards_of("requests")
    if shards:
        sha = shards[0].sha256
    else:
        sha = hashlib.sha256(request_ids.tobytes()).hexdigest()
    return RoutingData(model, request_ids, domains, prefill, decode, rows, phase, sha)


def split_requests(num_requests: int, test_fraction: float, seed: int) -> np.ndarray:
    """``[R]`` bool, true for held-out (test) requests: a seeded random ``test_fraction`` of them.

    At least one request lands on each side when there are two or more.
    """
    if not 0.0 < test_fraction < 1.0:
        raise PlacementError(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    n_test = int(round(num_requests * test_fraction))
    if num_requests >= 2:
        n_test = min(max(n_test, 1), num_requests - 1)
    rng = np.random.default_rng(seed)
    test = np.zeros(num_requests, dtype=bool)
    test[rng.permutation(num_requests)[:n_test]] = True
    return test


def signatures(counts: np.ndarray) -> np.ndarray:
    """``[R, L·E]`` float32: each request's counts over all layers, L2-normalised (zero rows stay zero)."""
    flat = counts.reshape(counts.shape[0], -1).astype(np.float32)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.where(norm > 0, norm, 1.0)
