"""Which node serves a request: ``random``, ``domain`` (the oracle label) or ``prefill``.

``prefill`` is what a server can do when decode starts: it has seen the request's prefill routing and
nothing else. The request's prefill signature (its prefill counts over all MoE layers, L2-normalised,
see :func:`moeprof.placement.data.signatures`) goes to the node of the nearest centroid (cosine).
Nodes take at most ``ceil(R / N · (1 + slack))`` requests so that attention work stays balanced:
requests are assigned most-confident first and the overflow goes to the next-nearest node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeprof.errors import PlacementError

GROUPINGS = ("random", "domain", "prefill")


@dataclass
class GroupingModel:
    kind: str
    nodes: int
    seed: int = 0
    slack: float = 0.1
    centroids: np.ndarray | None = None  # [C, L·E] unit rows, over prefill signatures
    cluster_nodes: list[list[int]] = field(default_factory=list)  # cluster -> nodes serving it
    domain_nodes: dict[str, list[float]] = field(default_factory=dict)  # domain -> share of it per node

    def assign(self, *, domains: np.ndarray, prefill_signatures: np.ndarray | None) -> np.ndarray:
        """``[R]`` node serving each request, from what this grouping may look at."""
        n = len(domains)
        if self.kind == "random":
            rng = np.random.default_rng(self.seed)
            return rng.permutation(n) % self.nodes
        if self.kind == "domain":
            return _weighted_round_robin(domains, self.domain_nodes, self.nodes)
        if prefill_signatures is None or self.centroids is None:
            raise PlacementError("prefill grouping needs prefill routing rows and a fitted centroid model")
        sim = prefill_signatures @ self.centroids.T  # [R, C]
        score = np.full((n, self.nodes), -np.inf, dtype=np.float64)
        for c, nodes in enumerate(self.cluster_nodes):
            for node in nodes:
                score[:, node] = np.maximum(score[:, node], sim[:, c])
        return balanced_assign(score, self.nodes, self.slack)

    def check(self, nodes: int, signature_width: int) -> None:
        """Raise :class:`PlacementError` unless the model fits ``nodes`` nodes and signatures of that width."""
        if self.nodes != nodes:
            raise PlacementError(f"grouping/nodes is {self.nodes}, the topology has {nodes} nodes")
        bad = [len(share) for share in self.domain_nodes.values() if len(share) != nodes]
        if bad:
            raise PlacementError(f"grouping/domain_nodes: a share list of {bad[0]} nodes, the topology has {nodes}")
        if self.kind != "prefill" or self.centroids is None:
            return
        c = self.centroids
        if c.ndim != 2 or c.shape[1] != signature_width or not np.isfinite(c).all():
            raise PlacementError(
                f"grouping/centroids: expected rows of {signature_width} finite numbers (MoE layers × experts), "
                f"got shape {c.shape}"
            )
        if len(self.cluster_nodes) != len(c) or not all(self.cluster_nodes):
            raise PlacementError(
                f"grouping/cluster_nodes: expected one non-empty list of nodes per centroid ({len(c)}), "
                f"got {self.cluster_nodes}"
            )
        outside = sorted({n for ns in self.cluster_nodes for n in ns if not 0 <= n < nodes})
        if outside:
            raise PlacementError(f"grouping/cluster_nodes: nodes {outside} outside 0..{nodes - 1}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(kind=self.kind, nodes=self.nodes, seed=self.seed, capacity_slack=self.slack)
        if self.kind == "prefill":
            d["signature"] = dict(phase="prefill", over="all MoE layers", normalise="l2", distance="cosine")
            d["centroids"] = np.round(self.centroids, 6).tolist() if self.centroids is not None else []
            d["cluster_nodes"] = self.cluster_nodes
        if self.domain_nodes:
            d["domain_nodes"] = {k: [round(x, 6) for x in v] for k, v in self.domain_nodes.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GroupingModel":
        cent = d.get("centroids")
        return cls(
            kind=d["kind"],
            nodes=int(d["nodes"]),
            seed=int(d.get("seed", 0)),
            slack=float(d.get("capacity_slack", 0.1)),
            centroids=np.asarray(cent, dtype=np.float32) if cent else None,
            cluster_nodes=[list(map(int, x)) for x in d.get("cluster_nodes", [])],
            domain_nodes={k: list(map(float, v)) for k, v in d.get("domain_nodes", {}).items()},
        )


def balanced_assign(score: np.ndarray, nodes: int, slack: float) -> np.ndarray:
    """Give each row the highest-scoring node that still has room; ``score`` is ``[R, N]``.

    Rows with the largest margin between their best and second-best node choose first; ties between
    equally good nodes go to the least loaded one.
    """
    n = score.shape[0]
    cap = int(np.ceil(n / nodes * (1.0 + slack))) if n else 0
    top2 = np.sort(score, axis=1)[:, -2:] if nodes > 1 else np.zeros((n, 2))
    margin = top2[:, -1] - top2[:, 0]
    order = np.argsort(-margin, kind="stable")
    load = np.zeros(nodes, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    for r in order:
        s = np.where(load < cap, score[r], -np.inf)
        best = s.max()
        tied = np.flatnonzero(s >= best - 1e-9)
        node = int(tied[np.argmin(load[tied])])
        out[r] = node
        load[node] += 1
    return out


def _weighted_round_robin(domains: np.ndarray, shares: dict[str, list[float]], nodes: int) -> np.ndarray:
    """Spread each domain's requests over nodes in proportion to ``shares[domain]`` (smooth round robin)."""
    out = np.empty(len(domains), dtype=np.int64)
    uniform = [1.0 / nodes] * nodes
    credit: dict[str, np.ndarray] = {}
    for i, d in enumerate(domains):
        w = np.asarray(shares.get(str(d), uniform), dtype=np.float64)
        w = w / w.sum() if w.sum() > 0 else np.full(nodes, 1.0 / nodes)
        c = credit.setdefault(str(d), np.zeros(nodes))
        c += w
        node = int(np.argmax(c))
        c[node] -= 1.0
        out[i] = node
    return out


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 30, engine: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded K-means (k-means++ start) of the rows of ``x``; returns ``(centroids[k, D], label[R])``.

    Runs as mergeable rounds over blocks of rows (:mod:`moeprof.placement.kmeans`), on ``engine``'s
    tasks when one is given, with the same result whatever runs them. ``k`` is capped at the number of
    rows (not of distinct rows: duplicate rows can leave a cluster empty). An empty cluster keeps its
    previous centroid rather than being re-seeded, so a cluster can end with no member and ``label``
    may use fewer than ``k`` ids; callers count the clusters they got (``label.max() + 1``).
    """
    from moeprof.placement.kmeans import fit_kmeans

    fit = fit_kmeans(x, k, seed, iters=iters, engine=engine)
    return fit.centroids, fit.labels


def one_hot(index: np.ndarray, n: int) -> np.ndarray:
    """``[len(index), n]`` float32 indicator matrix (sums by group become one matrix product)."""
    out = np.zeros((len(index), n), dtype=np.float32)
    out[np.arange(len(index)), index] = 1.0
    return out


def node_centroids(sig: np.ndarray, node: np.ndarray, nodes: int) -> np.ndarray:
    """``[N, D]`` unit mean signature of each node's requests (a zero row for a node with none)."""
    cent = one_hot(node, nodes).T @ sig
    norm = np.linalg.norm(cent, axis=1, keepdims=True)
    return cent / np.where(norm > 0, norm, 1.0)


def domain_shares(domains: np.ndarray, node: np.ndarray, nodes: int) -> dict[str, list[float]]:
    """Share of each domain's (train) requests that every node served."""
    out = {}
    for d in sorted(set(map(str, domains))):
        m = domains.astype(str) == d
        c = np.bincount(node[m], minlength=nodes).astype(np.float64)
        out[d] = (c / c.sum()).tolist()
    return out


def fit_grouping(
    kind: str,
    *,
    nodes: int,
    seed: int,
    train_domains: np.ndarray,
    train_prefill_sig: np.ndarray | None,
    train_node: np.ndarray | None,
    slack: float = 0.1,
    engine: Any = None,
) -> GroupingModel:
    """Learn a grouping of ``kind`` from the train requests.

    ``train_node`` is the node each train request was given by the policy (kmeans, locality); for
    policies without one, ``prefill`` clusters the prefill signatures into ``nodes`` groups and
    ``domain`` sends each domain to one node in turn. ``engine`` runs the K-means rounds (None: here).
    """
    if kind not in GROUPINGS:
        raise PlacementError(f"unknown grouping {kind!r}; choose one of {', '.join(GROUPINGS)}")
    model = GroupingModel(kind=kind, nodes=nodes, seed=seed, slack=slack)
    if kind == "random":
        return model
    if kind == "domain":
        if train_node is None:
            names = sorted(set(map(str, train_domains)))
            train_node = np.array([names.index(str(d)) % nodes for d in train_domains], dtype=np.int64)
        model.domain_nodes = domain_shares(train_domains, train_node, nodes)
        return model
    if train_prefill_sig is None or not np.any(train_prefill_sig):
        raise PlacementError(
            "--grouping prefill needs prefill routing rows and the trace has none; use --grouping random or domain"
        )
    if train_node is None:
        _, labels = kmeans(train_prefill_sig, nodes, seed, engine=engine)
        train_node = balanced_assign(_cos(train_prefill_sig, node_centroids(train_prefill_sig, labels, nodes)), nodes, slack)
    model.centroids = node_centroids(train_prefill_sig, train_node, nodes)
    model.cluster_nodes = [[n] for n in range(nodes)]
    return model


def _cos(sig: np.ndarray, cent: np.ndarray) -> np.ndarray:
    return sig @ cent.T
