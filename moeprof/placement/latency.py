"""Predicted time of one MoE layer in one decode step: dispatch + combine + expert compute.

A first-order model, stated so that every number can be worked by hand:

* **Communication.** Every hop of the dispatch (see :mod:`moeprof.placement.traffic`) carries one
  hidden state, ``hidden × act_bytes`` bytes. Per GPU, the bytes it sends and receives over the
  network and over NVLink are summed; links are full duplex, so a GPU's network time is
  ``max(sent, received) / inter_bw`` and its NVLink time ``max(sent, received) / intra_bw``; the two
  paths run concurrently (DeepEP overlaps RDMA and NVLink), so the GPU's dispatch time is the larger.
  The dispatch ends when the slowest GPU is done: ``t_dispatch = max_g(...) + link_latency``
  (``link_latency`` only when anything moves). The combine returns the same bytes along the same
  hops, so ``t_combine = t_dispatch``.
* **Expert compute** (a roofline). An expert is a gated MLP, three ``hidden × inter`` matrices:
  a token-route costs ``6 · hidden · inter`` FLOPs; each expert copy that receives at least one
  token reads its ``3 · hidden · inter · weight_bytes`` bytes of weights, and each token-route reads
  and writes one hidden state. ``t_g = max(flops_g / peak_flops, bytes_g / hbm_bw)``;
  the layer waits for the slowest GPU: ``t_compute = max_g t_g``.
* ``t_layer = t_dispatch + t_combine + t_compute`` (no overlap of communication with compute;
  two-batch overlap would hide up to the smaller of the two).

Worked example (``tests/test_latency.py``): hidden 1024, inter 512, 2-byte activations and weights;
one layer, one GPU sends 4 hops over the network and 2 over NVLink and receives nothing; GPU 0 serves
8 token-routes on 2 experts. Inter 50 GB/s, intra 450 GB/s, 1000 TFLOP/s, 3350 GB/s:
``t_dispatch = max(4·2048/50e9, 2·2048/450e9) = 163.84 ns``; compute: FLOPs 8·6·1024·512 = 25.2 M
(25.2 ns), bytes 2·3·1024·512·2 + 8·2·2048 = 6.32 MB (1.888 µs): ``t_compute = 1.888 µs``;
``t_layer = 2·0.16384 + 1.888 = 2.216 µs``.

Presets are the vendors' nominal peaks (per GPU, per direction); measured all-to-all bandwidth is
lower (DeepEP reports about 150 GB/s over NVLink and 40-60 GB/s over 400 Gb/s RDMA), so pass the
figures you measured with ``--intra-bw`` / ``--inter-bw`` when you have them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from moeprof.errors import UsageError

# GB/s per GPU per direction
INTRA_FABRICS = {"nvlink4": 450.0, "nvlink3": 300.0, "pcie5": 64.0}
INTER_FABRICS = {"ib400": 50.0, "roce400": 50.0, "ib200": 25.0}
# dense BF16 tensor TFLOP/s and HBM GB/s (SXM parts)
GPUS = {"h100": (989.0, 3350.0), "h200": (989.0, 4800.0)}


@dataclass(frozen=True)
class Hardware:
    intra_gbps: float = INTRA_FABRICS["nvlink4"]
    inter_gbps: float = INTER_FABRICS["ib400"]
    tflops: float = GPUS["h100"][0]
    hbm_gbps: float = GPUS["h100"][1]
    link_latency_us: float = 0.0
    name: str = "h100 + nvlink4 + ib400"

    def to_dict(self) -> dict:
        return asdict(self)


def hardware(gpu: str = "h100", intra: str = "nvlink4", inter: str = "ib400", *, intra_gbps: float | None = None,
             inter_gbps: float | None = None, tflops: float | None = None, hbm_gbps: float | None = None,
             link_latency_us: float = 0.0) -> Hardware:
    """Presets by name, each figure overridable."""
    for name, table, opt in ((gpu, GPUS, "--gpu"), (intra, INTRA_FABRICS, "--intra-fabric"),
                             (inter, INTER_FABRICS, "--inter-fabric")):
        if name not in table:
            raise UsageError(f"{opt} {name!r}: choose one of {', '.join(table)}")
    hw = Hardware(
        intra_gbps=intra_gbps or INTRA_FABRICS[intra],
        inter_gbps=inter_gbps or INTER_FABRICS[inter],
        tflops=tflops or GPUS[gpu][0],
        hbm_gbps=hbm_gbps or GPUS[gpu][1],
        link_latency_us=link_latency_us,
        name=f"{gpu if tflops is None and hbm_gbps is None else 'custom GPU'} + "
             f"{intra if intra_gbps is None else f'{intra_gbps:g} GB/s'} + "
             f"{inter if inter_gbps is None else f'{inter_gbps:g} GB/s'}",
    )
    for field, v in (("--intra-bw", hw.intra_gbps), ("--inter-bw", hw.inter_gbps), ("--gpu-tflops", hw.tflops),
                     ("--gpu-hbm-bw", hw.hbm_gbps)):
        if not v > 0:
            raise UsageError(f"{field} must be positive, got {v}")
    if link_latency_us < 0:
        raise UsageError(f"--link-latency-us must be 0 or more, got {link_latency_us}")
    return hw


@dataclass(frozen=True)
class ExpertShape:
    hidden: int
    inter: int
    act_bytes: int
    weight_bytes: int

    @property
    def expert_bytes(self) -> int:
        """Weights of one expert: gate, up and down projections."""
        return 3 * self.hidden * self.inter * self.weight_bytes

    @property
    def hop_bytes(self) -> int:
        return self.hidden * self.act_bytes


def comm_time(send_net: np.ndarray, recv_net: np.ndarray, send_nvl: np.ndarray, recv_nvl: np.ndarray,
              hw: Hardware) -> np.ndarray:
    """Seconds of one dispatch (= one combine). Arguments are bytes ``[..., NG]``; returns ``[...]``."""
    net = np.maximum(send_net, recv_net) / (hw.inter_gbps * 1e9)
    nvl = np.maximum(send_nvl, recv_nvl) / (hw.intra_gbps * 1e9)
    t = np.maximum(net, nvl).max(-1)
    moved = (send_net + send_nvl).sum(-1) > 0
    return t + np.where(moved, hw.link_latency_us * 1e-6, 0.0)


def compute_time(routes: np.ndarray, active: np.ndarray, shape: ExpertShape, hw: Hardware) -> np.ndarray:
    """Seconds of expert compute on the slowest GPU. ``routes[..., NG]`` token-routes and
    ``active[..., NG]`` expert copies with at least one token, per GPU; returns ``[...]``."""
    flops = routes * 6.0 * shape.hidden * shape.inter
    nbytes = active * float(shape.expert_bytes) + routes * 2.0 * shape.hop_bytes
    t = np.maximum(flops / (hw.tflops * 1e12), nbytes / (hw.hbm_gbps * 1e9))
    return t.max(-1)


def migration_time(recv_net: np.ndarray, recv_nvl: np.ndarray, hw: Hardware) -> float:
    """Seconds to move expert weights: per GPU, bytes received over each link class ``[NG]``; the
    slowest GPU sets the pace (the network and NVLink copies run concurrently)."""
    return float(np.maximum(recv_net / (hw.inter_gbps * 1e9), recv_nvl / (hw.intra_gbps * 1e9)).max(initial=0.0))
