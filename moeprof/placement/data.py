"""What placement and simulation read from a trace: per-request counts and per-token expert sets.

Of a request sample only, within a budget (:mod:`moeprof.placement.sample`: R below is the number of
sampled requests, every request of a trace under the budget).

Kept small on purpose (``moeprof.analysis`` has the full statistics). Shapes, with R requests, L MoE
layers (in ``manifest.model.moe_layers`` order), E experts, k experts per token, n routing rows of
one phase:

* ``RoutingData.prefill`` / ``.decode``: ``[R, L, E]`` token-routes per request, layer and expert;
* ``TokenRows``: one row per (token, layer) of the simulated phase: ``request[n]`` (index into the
  requests), ``step[n]``, ``token[n]`` (a dense token index), ``layer[n]`` (MoE ordinal) and
  ``experts[n, k]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

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
    sample: Any = None  # the RequestSample these requests are (moeprof.placement.sample)
    totals: np.ndarray | None = None  # [2 (train, held out), 2 (prefill, decode), L, E] over every row

    @property
    def held_out(self) -> np.ndarray:
        """``[R]`` bool: the sample's requests that the split over the whole trace holds out."""
        return self.sample.held_out

    def train_total(self, train: np.ndarray) -> np.ndarray | None:
        """``[L, E]`` token-routes of the simulated phase over every train request of the trace
        (not only the sampled ones), when ``train`` is the sample's own train side; else None."""
        if self.totals is None or self.sample is None or not np.array_equal(train, ~self.sample.held_out):
            return None
        return self.totals[0, 0 if self.phase == "prefill" else 1]

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    def counts(self, phase: str) -> np.ndarray:
        return self.prefill if phase == "prefill" else self.decode


def load_routing(trace: Trace, phase: str = "decode", engine=None, sample=None, totals: bool = False) -> RoutingData:
    """Read the counts and token rows a placement needs from ``trace``; ``phase`` is the one simulated.

    Only the requests of ``sample`` (a :class:`~moeprof.placement.sample.RequestSample`; default: the
    default budgets, every request held out) are kept; one task per shard reads them on ``engine``
    (:mod:`moeprof.analysis.engine`), and the rows come back in the trace's order, so the result is
    the same on any engine. ``totals``: also the per-expert loads of both splits over every row."""
    from moeprof.placement.sample import gather, plan_sample

    if sample is None:
        sample = plan_sample(trace, phase=phase, engine=engine)
    got = gather(trace, sample, phase=phase, engine=engine, totals=totals)
    rs, step, pos = got.request, got.step, got.pos
    key = (rs * (int(step.max(initial=0)) + 1) + step) * (int(pos.max(initial=0)) + 1) + pos
    _, token = np.unique(key, return_inverse=True)
    rows = TokenRows(rs, step, token.reshape(-1).astype(np.int64), got.layer, got.experts)
    sample.stats = dict(rows=int(len(rs)), shards_read=got.shards_read,
                        shards_in_trace=len(trace.manifest.shards_of("routing")), rows_read=got.rows_read)
    return RoutingData(trace.model, sample.ids, sample.domains[sample.index], got.prefill, got.decode, rows, phase,
                       sample.requests_sha256, sample=sample, totals=got.totals)


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
