"""Who sends how many bytes to whom: the hops of every token's dispatch, the rank × rank traffic
matrix, and a rank cost matrix (SGLang's ``{"rank_cost_matrix": ...}``) that placement can honour.

Hops follow the serving model of :mod:`moeprof.placement.simulate` (DeepEP's RDMA-then-NVLink path).
A token on source GPU ``s`` whose k experts sit on the distinct GPUs ``D``:

* on its own node, one NVLink hop ``s → d`` for every ``d ∈ D``, ``d ≠ s``;
* for every other node ``m`` holding one of them, one network hop ``s → e`` where ``e`` is ``m``'s GPU
  with ``s``'s local index (the *entry* GPU), then one NVLink hop ``e → d`` for every ``d ∈ D`` on
  ``m`` other than ``e``.

The combine sends the results back along the same hops in reverse. Summed over hops these are the
simulator's cross-node and intra-node crossings exactly (a test checks it).

Worked example (the simulator's): 2 nodes × 2 GPUs, a token on GPU 0 routed to GPUs {1, 2}: hops
0 → 1 (NVLink) and 0 → 2 (network; GPU 2 is node 1's entry for local index 0). Hidden 4 × 2 bytes:
the matrix holds 8 bytes at [0, 1], [0, 2] (dispatch) and 8 at [1, 0], [2, 0] (combine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeprof.errors import PlacementError
from moeprof.placement.simulate import dispatch_table
from moeprof.placement.topology import Topology


def choose_slots(phy2log: np.ndarray, topo: Topology, layer: np.ndarray, src: np.ndarray,
                 experts: np.ndarray, token: np.ndarray) -> np.ndarray:
    """``[n, k]`` physical slot serving each token-route under the simulator's replica choice.

    ``layer[n]`` (MoE ordinal), ``src[n]`` (source GPU), ``experts[n, k]``, ``token[n]`` (picks among
    equally near copies, ``token mod copies``)."""
    cand, count = dispatch_table(phy2log, topo)
    c = count[layer[:, None], src[:, None], experts]
    pick = token[:, None] % np.maximum(c, 1)
    return cand[layer[:, None], src[:, None], experts, pick]


@dataclass
class Hops:
    """One row per hop of a dispatch: ``row`` (index of the token row), sender ``a``, receiver ``b``,
    and ``network`` (true for a hop between nodes)."""

    row: np.ndarray
    a: np.ndarray
    b: np.ndarray
    network: np.ndarray


def dispatch_hops(src: np.ndarray, gpu: np.ndarray, topo: Topology) -> Hops:
    """Hops of every token row, from ``src[n]`` (source GPU) and ``gpu[n, k]`` (GPU of each route)."""
    G = topo.gpus_per_node
    n, k = gpu.shape
    s = np.sort(gpu, axis=1)
    first = np.ones_like(s, dtype=bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    row = np.repeat(np.arange(n), k).reshape(n, k)[first]
    d = s[first]
    sr = src[row]
    home = sr // G
    dn = d // G
    local = dn == home
    # own node: s -> d over NVLink
    own = local & (d != sr)
    # remote nodes: one network hop per distinct node, to the entry GPU
    entry = dn * G + sr % G
    remote = ~local
    rr, rn = row[remote], dn[remote]
    key = rr * topo.nodes + rn
    _, uniq = np.unique(key, return_index=True)
    net_row = rr[uniq]
    net_b = (rn[uniq] * G + src[net_row] % G)
    fwd = remote & (d != entry)
    rows = np.concatenate([row[own], net_row, row[fwd]])
    a = np.concatenate([sr[own], src[net_row], entry[fwd]])
    b = np.concatenate([d[own], net_b, d[fwd]])
    network = np.concatenate([np.zeros(own.sum(), bool), np.ones(len(net_row), bool), np.zeros(fwd.sum(), bool)])
    return Hops(rows, a, b, network)


def traffic_matrix(hops: Hops, num_gpus: int, bytes_per_hop: float, num_tokens: int) -> np.ndarray:
    """``[NG, NG]`` bytes per token from rank a (row) to rank b (column), dispatch plus combine
    (the combine's bytes go the other way along each hop)."""
    m = np.bincount(hops.a * num_gpus + hops.b, minlength=num_gpus * num_gpus).reshape(num_gpus, num_gpus)
    m = (m + m.T).astype(np.float64) * bytes_per_hop
    return m / max(num_tokens, 1)


# -- rank cost matrix -------------------------------------------------------------------------------
def load_rank_cost_matrix(path: str | Path, num_ranks: int) -> np.ndarray:
    """Read SGLang's EP topology file, ``{"rank_cost_matrix": [[0, 1], [1, 0]]}``.

    The format and its checks are those of SGLang's ``load_rank_cost_matrix``
    (``python/sglang/srt/eplb/topology.py``, read by ``--eplb-topology`` for
    ``--eplb-algorithm topology_aware``): a bare list is accepted too; the matrix must be square with
    one row per EP rank, finite, non-negative, with a zero diagonal. Values are relative costs.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise PlacementError(f"{path}: cannot read the rank cost matrix ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise PlacementError(f"{path}: not JSON ({exc}); expected {{\"rank_cost_matrix\": [[...], ...]}}") from None
    if isinstance(data, dict):
        if "rank_cost_matrix" not in data:
            raise PlacementError(f"{path}: no \"rank_cost_matrix\" key; expected {{\"rank_cost_matrix\": [[...], ...]}}")
        data = data["rank_cost_matrix"]
    try:
        m = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise PlacementError(f"{path}: rank_cost_matrix must be a rectangular array of numbers") from None
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise PlacementError(f"{path}: rank_cost_matrix must be square, got shape {m.shape}")
    if m.shape[0] != num_ranks:
        raise PlacementError(
            f"{path}: rank_cost_matrix has {m.shape[0]} ranks, the topology has {num_ranks} GPUs; "
            "give one row and column per GPU (EP rank)")
    if not np.isfinite(m).all() or (m < 0).any():
        raise PlacementError(f"{path}: rank_cost_matrix must be finite and non-negative")
    if np.any(np.diag(m) != 0):
        raise PlacementError(f"{path}: rank_cost_matrix diagonal must be zero (sending to oneself is free)")
    return m


def default_rank_cost(topo: Topology, intra: float = 1.0, inter: float = 10.0) -> np.ndarray:
    """``[NG, NG]`` 0 on the diagonal, ``intra`` inside a node, ``inter`` between nodes."""
    node = np.arange(topo.num_gpus) // topo.gpus_per_node
    m = np.where(node[:, None] == node[None, :], intra, inter).astype(np.float64)
    np.fill_diagonal(m, 0.0)
    return m


def prefer_cheap_links(phy2log: np.ndarray, src_counts: np.ndarray, cost: np.ndarray, topo: Topology,
                       max_swaps: int = 256) -> tuple[np.ndarray, dict]:
    """Swap experts between GPUs to lower the cost-weighted traffic without raising any layer's
    busiest-GPU load, the way SGLang's ``topology_aware`` EPLB refines a balanced seed.

    ``phy2log[L, P]``; ``src_counts[NG, L, E]`` token-routes by source GPU (the fit window);
    ``cost[NG, NG]``. Only experts with a single copy move (a replicated expert's load depends on
    which copy a token picks). Each step takes the swap with the largest cost reduction whose two
    GPUs stay at or under the layer's busiest-GPU load. Returns the new ``phy2log`` and a summary.
    """
    L, P = phy2log.shape
    S, NG, E = topo.slots_per_gpu, topo.num_gpus, topo.num_experts
    out = phy2log.copy()
    gpu_of = np.arange(P) // S
    before = after = 0.0
    swaps = 0
    for layer in range(L):
        row = out[layer]
        w = src_counts[:, layer, :].astype(np.float64)  # [NG, E]
        load_e = w.sum(0)
        place_cost = w.T @ cost  # [E, NG]: cost of expert e living on GPU g
        single = np.bincount(row, minlength=E) == 1
        gl = np.bincount(gpu_of, weights=load_e[row] / np.bincount(row, minlength=E)[row], minlength=NG)
        cap = gl.max()
        before += float(place_cost[row, gpu_of].sum())
        for _ in range(max_swaps):
            ea, eb = row[:, None], row[None, :]
            ga, gb = gpu_of[:, None], gpu_of[None, :]
            gain = place_cost[ea, ga] + place_cost[eb, gb] - place_cost[ea, gb] - place_cost[eb, ga]
            delta = load_e[ea] - load_e[eb]  # load moving from ga to gb
            ok = (ga != gb) & single[ea] & single[eb] & (gain > 1e-9)
            ok &= (gl[ga] - delta <= cap + 1e-9) & (gl[gb] + delta <= cap + 1e-9)
            if not ok.any():
                break
            g = np.where(ok, gain, -np.inf)
            i, j = np.unravel_index(int(np.argmax(g)), g.shape)
            d = load_e[row[i]] - load_e[row[j]]
            gl[gpu_of[i]] -= d
            gl[gpu_of[j]] += d
            row[i], row[j] = row[j], row[i]
            swaps += 1
        after += float(place_cost[row, gpu_of].sum())
    return out, dict(swaps=swaps, cost_before=before, cost_after=after)
