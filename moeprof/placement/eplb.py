"""DeepSeek's expert-parallel load balancer (EPLB), reimplemented in numpy.

The algorithm is the one published in deepseek-ai/EPLB (``eplb.py``, MIT): replicate the heaviest
experts into the redundant slots, then pack the physical experts onto GPUs so that every GPU gets the
same number of them and loads as even as greedy packing makes them. Two variants:

* **hierarchical** (when the number of expert groups is a multiple of the number of nodes): pack whole
  expert groups onto nodes first (DeepSeek-V3's group-limited routing keeps a token inside a few groups,
  so keeping a group on one node saves inter-node traffic), replicate within each node, pack onto the
  node's GPUs;
* **global** (otherwise): the same with one group and one node, i.e. replicate and pack over all GPUs.

Shapes: ``weight`` is ``[layers, num_logical]`` (token-routes per expert; any non-negative float);
``phy2log`` is ``[layers, num_physical]``, ``log2phy`` ``[layers, num_logical, X]`` (-1 padded) and
``logcnt`` ``[layers, num_logical]``, the three outputs of ``eplb.rebalance_experts``.

Worked example (the EPLB README's): two layers of 12 experts, 16 physical slots on 2 nodes × 4 GPUs,
4 expert groups. Layer 0's loads ``[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]`` give
``phy2log[0] = [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]``: experts 5, 4, 10 and 1 (the
heaviest of their node) get a second copy, and GPU 0 holds experts 5 and 6.
"""

from __future__ import annotations

import numpy as np


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``n`` weighted items into ``num_packs`` packs of exactly ``n / num_packs`` items each.

    Greedy: items in decreasing weight go to the lightest pack that still has room (ties: the lowest
    pack index). ``weight`` is ``[X, n]``; returns ``pack[X, n]`` and ``rank_in_pack[X, n]``.
    """
    rows, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{n} items do not split into {num_packs} equal packs")
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n), (rows, 1)), np.zeros((rows, n), dtype=np.int64)
    pack = np.full((rows, n), -1, dtype=np.int64)
    rank = np.full((rows, n), -1, dtype=np.int64)
    order = np.argsort(-weight, axis=1, kind="stable")
    for i in range(rows):
        # plain lists: a handful of packs is faster to scan in Python than through numpy calls
        load = [0.0] * num_packs
        count = [0] * num_packs
        w = weight[i].tolist()
        for item in order[i].tolist():
            j = min((p for p in range(num_packs) if count[p] < per_pack), key=load.__getitem__)
            pack[i, item] = j
            rank[i, item] = count[j]
            load[j] += w[item]
            count[j] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give ``num_physical - num_logical`` extra copies, one at a time, to the expert whose per-copy load is highest.

    ``weight`` is ``[X, num_logical]``. Returns ``phy2log[X, num_physical]`` (the first ``num_logical``
    slots are the experts themselves), ``rank[X, num_physical]`` (which copy of its expert a slot is)
    and ``logcnt[X, num_logical]``.
    """
    rows, num_logical = weight.shape
    if num_physical < num_logical:
        raise ValueError(f"{num_physical} physical slots cannot hold {num_logical} experts")
    phy2log = np.tile(np.arange(num_physical), (rows, 1))
    rank = np.zeros((rows, num_physical), dtype=np.int64)
    logcnt = np.ones((rows, num_logical), dtype=np.int64)
    r = np.arange(rows)
    for slot in range(num_logical, num_physical):
        hottest = np.argmax(weight / logcnt, axis=1)
        phy2log[:, slot] = hottest
        rank[:, slot] = logcnt[r, hottest]
        logcnt[r, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a permutation ``[X, n]``."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hierarchical EPLB; returns ``phy2log[L, P]``, ``phy_rank[L, P]``, ``logcnt[L, E]``."""
    layers, num_logical = weight.shape
    if num_logical % num_groups or num_groups % num_nodes or num_gpus % num_nodes or num_physical % num_gpus:
        raise ValueError(
            f"EPLB needs experts ({num_logical}) divisible by groups ({num_groups}), groups by nodes "
            f"({num_nodes}), GPUs ({num_gpus}) by nodes and slots ({num_physical}) by GPUs"
        )
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical // num_gpus
    experts_per_node = num_logical // num_nodes

    # Step 1: pack expert groups onto nodes, balancing the nodes' total load.
    group_load = weight.reshape(layers, num_groups, group_size).sum(-1)
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    # "node-major" logical order: the experts of node 0's groups first, then node 1's, ...
    first = (group_node * groups_per_node + group_rank) * group_size  # [L, groups]
    log2nodemajor = (first[:, :, None] + np.arange(group_size)).reshape(layers, num_logical)
    nodemajor2log = _inverse(log2nodemajor)

    # Step 2: replicate within each node (each node gets num_physical / num_nodes slots).
    node_weight = np.take_along_axis(weight, nodemajor2log, axis=1).reshape(layers * num_nodes, experts_per_node)
    phy2nm, phy_rank, nm_count = replicate_experts(node_weight, num_physical // num_nodes)

    # Step 3: pack each node's physical experts onto its GPUs by per-copy load.
    per_copy = np.take_along_axis(node_weight / nm_count, phy2nm, axis=1)
    gpu, rank_on_gpu = balanced_packing(per_copy, num_gpus // num_nodes)
    phy2packed = gpu * slots_per_gpu + rank_on_gpu
    packed2phy = _inverse(phy2packed)

    packed2nm = np.take_along_axis(phy2nm, packed2phy, axis=1)
    offsets = (np.arange(num_nodes) * experts_per_node)[None, :, None]
    packed2nm = (packed2nm.reshape(layers, num_nodes, -1) + offsets).reshape(layers, num_physical)
    phy2log = np.take_along_axis(nodemajor2log, packed2nm, axis=1)
    rank = np.take_along_axis(phy_rank, packed2phy, axis=1).reshape(layers, num_physical)
    logcnt = np.take_along_axis(nm_count.reshape(layers, num_logical), log2nodemajor, axis=1)
    return phy2log, rank, logcnt


def rebalance_experts(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point: hierarchical when ``num_groups % num_nodes == 0``, else global.

    Returns ``phy2log[L, num_replicas]``, ``log2phy[L, E, X]`` (-1 padded) and ``logcnt[L, E]``.
    """
    weight = np.asarray(weight, dtype=np.float64)
    layers, num_logical = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, rank, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    log2phy = np.full((layers, num_logical, int(logcnt.max())), -1, dtype=np.int64)
    rows = np.repeat(np.arange(layers), num_replicas)
    log2phy[rows, phy2log.ravel(), rank.ravel()] = np.tile(np.arange(num_replicas), layers)
    return phy2log, log2phy, logcnt


def logical_to_physical(phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    """``[L, E, X]``: the physical slots of every logical expert in increasing order, -1 padded."""
    layers, num_physical = phy2log.shape
    counts = np.stack([np.bincount(row, minlength=num_logical) for row in phy2log])
    width = max(1, int(counts.max()))
    out = np.full((layers, num_logical, width), -1, dtype=np.int64)
    for layer in range(layers):
        order = np.argsort(phy2log[layer], kind="stable")  # slots grouped by expert, ascending
        experts = phy2log[layer][order]
        starts = np.concatenate([[0], np.cumsum(counts[layer])[:-1]])
        col = np.arange(num_physical) - starts[experts]
        out[layer, experts, col] = order
    return out
