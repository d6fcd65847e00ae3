"""Traffic and load of a placement, token by token: the cost model of DeepSeek-style decode serving.

Serving model. Every request is served by one node (its attention / data-parallel ranks) and, within
it, by one source GPU (requests are dealt to the node's GPUs in turn). At every MoE layer a token's
hidden state goes to each GPU holding one of its k experts and the results come back (combine):

* across the network once per *destination node* other than its own (``remote nodes``);
* inside a node once per *destination GPU* other than the node's entry GPU: the source GPU on the own
  node, and on a remote node the GPU with the source's local index, where the network transfer lands
  (DeepEP's RDMA-then-NVLink path).

Bytes per crossing = ``hidden_size × dtype_bytes``; dispatch and combine each cross, hence the factor 2.

Replica choice (which copy of an expert a token uses): a copy on the source GPU, else one on the
source node, else any copy; among several, the token index picks (``token mod copies``), so a hot
expert's copies share the load.

Load: token-routes landing on each GPU, per MoE layer and per micro-batch of B tokens (tokens ordered
by decode step, then request, as concurrent requests would batch). Expert capacity per micro-batch:
``capacity = max(B·k / P · capacity_factor, min_capacity)`` per physical expert (P = E without
redundancy); routes beyond it are dropped.

Worked example (the test's): 2 nodes × 2 GPUs, one expert per GPU (expert e on GPU e), k = 2, a
token served by GPU 0 routed to experts {1, 2}: GPU 1 is on its node (1 NVLink crossing), GPU 2 is on
node 1 (1 network crossing; it is node 1's entry GPU, local index 0, so no NVLink there). With a
hidden size of 4 and 2-byte elements: 2·1·8 = 16 cross-node bytes and 16 intra-node bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeprof.placement.data import TokenRows
from moeprof.placement.topology import Topology


@dataclass
class SimConfig:
    hidden_size: int = 7168
    dtype_bytes: int = 2
    batch_size: int = 256
    capacity_factors: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 3.0)
    capacity_batch_sizes: tuple[int, ...] = (16, 64, 256, 1024)
    min_capacity: int = 4
    max_drop_share: float = 0.01
    node_limits: tuple[int, ...] = (1, 2, 4)


def source_gpus(node_of_request: np.ndarray, topo: Topology) -> np.ndarray:
    """``[R]`` global source GPU of each request: a node's requests are dealt to its GPUs in turn."""
    out = np.empty(len(node_of_request), dtype=np.int64)
    for node in range(topo.nodes):
        idx = np.flatnonzero(node_of_request == node)
        out[idx] = node * topo.gpus_per_node + np.arange(len(idx)) % topo.gpus_per_node
    return out


def dispatch_table(phy2log: np.ndarray, topo: Topology) -> tuple[np.ndarray, np.ndarray]:
    """Candidate copies for every (layer, source GPU, expert) under the replica-choice rule.

    Returns ``cand[L, NG, E, X]`` (physical slots in increasing order, -1 padded) and
    ``count[L, NG, E]`` (0 only for an expert without any copy).
    """
    L, P = phy2log.shape
    E, NG, G = topo.num_experts, topo.num_gpus, topo.gpus_per_node
    gpu = topo.gpu_of_slot()
    src = np.arange(NG)[:, None]
    # preference class of slot p for source GPU s: 0 on s, 1 on s's node, 2 elsewhere
    cls = np.where(gpu[None, :] == src, 0, np.where(gpu[None, :] // G == src // G, 1, 2))  # [NG, P]
    width = int(max(np.bincount(row, minlength=E).max() for row in phy2log))
    cand = np.full((L, NG, E, width), -1, dtype=np.int64)
    count = np.zeros((L, NG, E), dtype=np.int64)
    p = np.arange(P)
    rows = np.repeat(np.arange(NG), P).reshape(NG, P)
    for layer in range(L):
        e_of = phy2log[layer]
        order = np.argsort((e_of[None, :] * 3 + cls) * P + p[None, :], axis=1)  # by expert, class, slot
        se = e_of[order]
        sc = np.take_along_axis(cls, order, axis=1)
        start = np.ones((NG, P), dtype=bool)
        start[:, 1:] = se[:, 1:] != se[:, :-1]
        best = np.full((NG, E), 3)
        best[rows[start], se[start]] = sc[start]
        take = sc == best[rows, se]
        block_start = np.maximum.accumulate(np.where(start, p[None, :], 0), axis=1)
        pos = p[None, :] - block_start
        cand[layer, rows[take], se[take], pos[take]] = order[take]
        np.add.at(count[layer], (rows[take], se[take]), 1)
    return cand, count


def expected_slot_load(src_counts: np.ndarray, phy2log: np.ndarray, topo: Topology) -> np.ndarray:
    """``[L, P]`` expected token-routes per physical slot given ``src_counts[NG, L, E]`` routes by source GPU."""
    cand, count = dispatch_table(phy2log, topo)
    L, P = phy2log.shape
    load = np.zeros((L, P))
    for layer in range(L):
        per = src_counts[:, layer, :] / np.maximum(count[layer], 1)  # [NG, E]
        for j in range(cand.shape[-1]):
            slot = cand[layer, :, :, j]
            m = slot >= 0
            np.add.at(load[layer], slot[m], per[m])
    return load


def gpu_max_mean(slot_load: np.ndarray, topo: Topology) -> np.ndarray:
    """``[...]`` max/mean over GPUs of ``slot_load[..., P]`` (1.0 where nothing is routed)."""
    g = slot_load.reshape(*slot_load.shape[:-1], topo.num_gpus, topo.slots_per_gpu).sum(-1)
    mean = g.mean(-1)
    return np.where(mean > 0, g.max(-1) / np.where(mean > 0, mean, 1), 1.0)


@dataclass
class SimResult:
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.metrics


def _distinct_per_row(x: np.ndarray) -> np.ndarray:
    """``[n, k]`` -> ``[n, k]`` bool marking the first occurrence of each value in a row (after sorting)."""
    s = np.sort(x, axis=1)
    first = np.ones_like(s, dtype=bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    return s, first


def simulate(
    rows: TokenRows,
    phy2log: np.ndarray,
    topo: Topology,
    node_of_request: np.ndarray,
    cfg: SimConfig | None = None,
) -> dict[str, Any]:
    """Score a placement on ``rows`` (the held-out tokens); ``node_of_request[R]`` from the grouping."""
    cfg = cfg or SimConfig()
    L, P = phy2log.shape
    G, S = topo.gpus_per_node, topo.slots_per_gpu
    k = rows.experts.shape[1] if rows.experts.ndim == 2 else 0
    n_tokens = rows.num_tokens
    if n_tokens == 0:
        return dict(tokens=0, token_routes=0)
    src_of_request = source_gpus(node_of_request, topo)
    src = src_of_request[rows.request]  # [n]
    home = src // G
    cand, count = dispatch_table(phy2log, topo)
    e = rows.experts
    c = count[rows.layer[:, None], src[:, None], e]
    pick = rows.token[:, None] % c
    slot = cand[rows.layer[:, None], src[:, None], e, pick]  # [n, k]
    gpu = slot // S
    node = gpu // G

    sn, first_n = _distinct_per_row(node)
    dest_nodes = first_n.sum(1)
    remote_nodes = dest_nodes - (node == home[:, None]).any(1)
    sg, first_g = _distinct_per_row(gpu)
    dest_gpus = first_g.sum(1)
    entries = (first_g & (sg % G == (src % G)[:, None])).sum(1)
    intra = dest_gpus - entries
    per_crossing = 2 * cfg.hidden_size * cfg.dtype_bytes

    # micro-batches of B tokens in (step, request) order
    tok_step = np.zeros(n_tokens, dtype=np.int64)
    tok_req = np.zeros(n_tokens, dtype=np.int64)
    tok_step[rows.token] = rows.step
    tok_req[rows.token] = rows.request
    order = np.lexsort((tok_req, tok_step))
    rank = np.empty(n_tokens, dtype=np.int64)
    rank[order] = np.arange(n_tokens)

    def batch_slot_loads(B: int) -> np.ndarray | None:
        nb = n_tokens // B
        if nb == 0:
            return None
        tb = rank // B
        keep = tb[rows.token] < nb
        b = tb[rows.token][keep]
        idx = ((b[:, None] * L + rows.layer[keep][:, None]) * P + slot[keep]).ravel()
        return np.bincount(idx, minlength=nb * L * P).reshape(nb, L, P).astype(np.float64)

    B = min(cfg.batch_size, n_tokens)
    loads = batch_slot_loads(B)
    ratio = gpu_max_mean(loads, topo).ravel()
    whole = gpu_max_mean(np.bincount((rows.layer[:, None] * P + slot).ravel(), minlength=L * P).reshape(L, P).astype(float), topo)

    metrics: dict[str, Any] = dict(
        tokens=int(n_tokens),
        token_routes=int(slot.size),
        hidden_size=cfg.hidden_size,
        dtype_bytes=cfg.dtype_bytes,
        cross_node_bytes_per_token=float(remote_nodes.sum() * per_crossing / n_tokens),
        intra_node_bytes_per_token=float(intra.sum() * per_crossing / n_tokens),
        remote_nodes_per_token_layer=float(remote_nodes.mean()),
        local_node_share=float((node == home[:, None]).mean()),
        local_gpu_share=float((gpu == src[:, None]).mean()),
        batch_size=int(B),
        gpu_load_max_mean=dict(
            median=float(np.median(ratio)), p90=float(np.percentile(ratio, 90)), whole_split=float(whole.mean())
        ),
        node_limit={str(m): float((dest_nodes > m).mean()) for m in cfg.node_limits if m < topo.nodes},
        capacity=_capacity_report(batch_slot_loads, topo, k, cfg),
    )
    return metrics


def _capacity_report(batch_slot_loads, topo: Topology, k: int, cfg: SimConfig) -> list[dict[str, Any]]:
    """Drops and straggler factor after drops per batch size and capacity factor, and the smallest
    capacity factor that keeps drops under ``cfg.max_drop_share``."""
    P = topo.num_slots
    out = []
    for B in cfg.capacity_batch_sizes:
        loads = batch_slot_loads(B)
        if loads is None:
            continue
        total = loads.sum()
        base = B * k / P

        def drop_share(cap: float) -> float:
            return float(np.maximum(loads - cap, 0).sum() / total) if total else 0.0

        rows = []
        for cf in cfg.capacity_factors:
            cap = max(base * cf, cfg.min_capacity)
            kept = np.minimum(loads, cap)
            rows.append(
                dict(
                    capacity_factor=cf,
                    capacity=cap,
                    dropped_share=drop_share(cap),
                    straggler_median=float(np.median(gpu_max_mean(kept, topo))),
                )
            )
        # smallest capacity (before the min_capacity floor) with drops under the target: drops fall
        # as capacity grows, so bisect
        lo, hi = 0.0, float(loads.max())
        for _ in range(40):
            mid = (lo + hi) / 2
            if drop_share(mid) <= cfg.max_drop_share:
                hi = mid
            else:
                lo = mid
        needed_cf = hi / base
        out.append(dict(batch_size=int(B), grid=rows, capacity_factor_for_max_drop=float(needed_cf)))
    return out
