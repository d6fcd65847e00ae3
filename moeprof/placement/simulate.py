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

from moeprof.errors import PlacementError
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


SCORE_BLOCK_ROWS = 1 << 18
"""Token-layer rows of the scored split in one engine task (with an engine; without one, a single pass)."""


def simulate(
    rows: TokenRows,
    phy2log: np.ndarray,
    topo: Topology,
    node_of_request: np.ndarray,
    cfg: SimConfig | None = None,
    engine: Any = None,
) -> dict[str, Any]:
    """Score a placement on ``rows`` (the held-out tokens); ``node_of_request[R]`` from the grouping.

    The rows are scored in blocks, each to integer totals (crossings, own-node routes, token-routes
    per slot and micro-batch) that add up exactly; the ratios are taken from the sums. With an
    ``engine`` (:mod:`moeprof.analysis.engine`) each block of ``SCORE_BLOCK_ROWS`` rows is a task and
    the totals merge in a tree; the metrics are the same as from one pass, bit for bit."""
    cfg = cfg or SimConfig()
    L, P = phy2log.shape
    k = rows.experts.shape[1] if rows.experts.ndim == 2 else 0
    n_tokens = rows.num_tokens
    if n_tokens == 0:
        raise PlacementError(
            "no tokens of the simulated phase among the held-out requests; use a trace with more requests "
            "or a larger --test-fraction"
        )
    src = source_gpus(node_of_request, topo)[rows.request]  # [n]
    cand, count = dispatch_table(phy2log, topo)

    # micro-batches of B tokens in (step, request) order: a token's rank in that order, per row
    tok_step = np.zeros(n_tokens, dtype=np.int64)
    tok_req = np.zeros(n_tokens, dtype=np.int64)
    tok_step[rows.token] = rows.step
    tok_req[rows.token] = rows.request
    order = np.lexsort((tok_req, tok_step))
    rank = np.empty(n_tokens, dtype=np.int64)
    rank[order] = np.arange(n_tokens)
    B = min(cfg.batch_size, n_tokens)
    batches = {b: n_tokens // b for b in sorted({B, *cfg.capacity_batch_sizes}) if n_tokens // b > 0}

    shared = (cand, count, topo.gpus_per_node, topo.slots_per_gpu, topo.nodes, L, P, batches)
    n = len(rows.token)
    step = SCORE_BLOCK_ROWS if engine is not None else max(n, 1)
    items = [(f"score-block-{i:05d}", src[a:a + step], rows.token[a:a + step], rank[rows.token[a:a + step]],
              rows.layer[a:a + step], rows.experts[a:a + step]) for i, a in enumerate(range(0, n, step))]
    if engine is None:
        t = _score_block(items[0], shared)
    else:
        t = engine.map_reduce(_score_block, items, _add_totals, shared)

    def batch_slot_loads(b: int) -> np.ndarray | None:
        if b not in batches:
            return None
        keys, counts = t["batch"][b]
        dense = np.zeros(batches[b] * L * P, dtype=np.float64)  # counts, exact in float64: no int copy
        dense[keys] = counts
        return dense.reshape(batches[b], L, P)

    per_crossing = 2 * cfg.hidden_size * cfg.dtype_bytes
    routes = t["rows"] * k
    ratio = gpu_max_mean(batch_slot_loads(B), topo).ravel()
    whole = gpu_max_mean(t["whole"].reshape(L, P).astype(float), topo)
    metrics: dict[str, Any] = dict(
        tokens=int(n_tokens),
        token_routes=int(routes),
        hidden_size=cfg.hidden_size,
        dtype_bytes=cfg.dtype_bytes,
        cross_node_bytes_per_token=float(t["remote"] * per_crossing / n_tokens),
        intra_node_bytes_per_token=float(t["intra"] * per_crossing / n_tokens),
        remote_nodes_per_token_layer=float(t["remote"] / t["rows"]),
        local_node_share=float(t["own_node"] / routes),
        local_gpu_share=float(t["own_gpu"] / routes),
        batch_size=int(B),
        gpu_load_max_mean=dict(
            median=float(np.median(ratio)), p90=float(np.percentile(ratio, 90)), whole_split=float(whole.mean())
        ),
        node_limit={str(m): float(t["dest_nodes"][m + 1:].sum() / t["rows"]) for m in cfg.node_limits
                    if m < topo.nodes},
        capacity=_capacity_report(batch_slot_loads, topo, k, cfg),
    )
    return metrics


def _score_block(item: tuple, shared: tuple) -> dict[str, Any]:
    """Integer totals of one block of token-layer rows (see :func:`simulate`); numpy int64 throughout,
    so that sums and the ratios taken from them are those of a single pass."""
    _, src, token, rank, layer, experts = item
    cand, count, G, S, N, L, P, batches = shared
    c = count[layer[:, None], src[:, None], experts]
    pick = token[:, None] % c
    slot = cand[layer[:, None], src[:, None], experts, pick]  # [n, k]
    gpu = slot // S
    node = gpu // G
    home = src // G
    own_node = node == home[:, None]
    _, first_n = _distinct_per_row(node)
    dest_nodes = first_n.sum(1)
    remote_nodes = dest_nodes - own_node.any(1)
    sg, first_g = _distinct_per_row(gpu)
    entries = (first_g & (sg % G == (src % G)[:, None])).sum(1)
    intra = first_g.sum(1) - entries
    batch = {}
    for b, nb in batches.items():
        tb = rank // b
        keep = tb < nb
        idx = ((tb[keep][:, None] * L + layer[keep][:, None]) * P + slot[keep]).ravel()
        batch[b] = np.unique(idx, return_counts=True)  # sparse: a block touches few (batch, layer, slot)
    return dict(
        rows=np.int64(len(token)),
        remote=remote_nodes.sum(dtype=np.int64),
        intra=intra.sum(dtype=np.int64),
        own_node=own_node.sum(dtype=np.int64),
        own_gpu=(gpu == src[:, None]).sum(dtype=np.int64),
        dest_nodes=np.bincount(dest_nodes, minlength=N + 1).astype(np.int64),
        whole=np.bincount((layer[:, None] * P + slot).ravel(), minlength=L * P).astype(np.int64),
        batch=batch,
    )


def _add_totals(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two blocks' totals as one (exact: integers)."""
    out = {key: a[key] + b[key] for key in a if key != "batch"}
    out["batch"] = {}
    for size, (ka, ca) in a["batch"].items():
        kb, cb = b["batch"][size]
        keys, inv = np.unique(np.concatenate([ka, kb]), return_inverse=True)
        counts = np.zeros(len(keys), dtype=np.int64)
        np.add.at(counts, inv, np.concatenate([ca, cb]))
        out["batch"][size] = (keys, counts)
    return out


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
        buf = np.empty_like(loads)  # one scratch array for the 40 bisection steps (the same sums)

        def drop_share(cap: float) -> float:
            if not total:
                return 0.0
            np.subtract(loads, cap, out=buf)
            return float(np.maximum(buf, 0, out=buf).sum() / total)

        rows = []
        for cf in cfg.capacity_factors:
            cap = max(base * cf, cfg.min_capacity)
            dropped = drop_share(cap)
            kept = np.minimum(loads, cap, out=buf)
            rows.append(
                dict(
                    capacity_factor=cf,
                    capacity=cap,
                    dropped_share=dropped,
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
