"""The latency model worked by hand: dispatch/combine from per-link bytes, a roofline for the experts."""

from __future__ import annotations

import numpy as np
import pytest

from moeprof.errors import UsageError
from moeprof.placement.latency import ExpertShape, Hardware, comm_time, compute_time, hardware, migration_time

HW = Hardware(intra_gbps=450.0, inter_gbps=50.0, tflops=1000.0, hbm_gbps=3350.0)
SHAPE = ExpertShape(hidden=1024, inter=512, act_bytes=2, weight_bytes=2)


def test_hand_case_of_the_docstring():
    # GPU 0 sends 4 hidden states over the network and 2 over NVLink; GPU 1 receives them all
    hop = 1024 * 2
    send_net, recv_net = np.array([4 * hop, 0.0]), np.array([0.0, 4 * hop])
    send_nvl, recv_nvl = np.array([2 * hop, 0.0]), np.array([0.0, 2 * hop])
    t_disp = comm_time(send_net, recv_net, send_nvl, recv_nvl, HW)
    assert t_disp == pytest.approx(4 * 2048 / 50e9)  # 163.84 ns: the network is the slower path
    assert t_disp == pytest.approx(163.84e-9)
    # GPU 0 serves 8 token-routes on 2 experts; GPU 1 one route on one expert
    t_comp = compute_time(np.array([8.0, 1.0]), np.array([2.0, 1.0]), SHAPE, HW)
    flops = 8 * 6 * 1024 * 512
    nbytes = 2 * 3 * 1024 * 512 * 2 + 8 * 2 * 2048
    assert flops / 1e15 < nbytes / 3350e9  # memory-bound at decode batch sizes
    assert t_comp == pytest.approx(nbytes / 3350e9)
    assert t_comp == pytest.approx(1.88783e-6, rel=1e-5)
    assert 2 * t_disp + t_comp == pytest.approx(2.21551e-6, rel=1e-5)


def test_compute_turns_flop_bound_with_many_tokens():
    # 4096 routes on one expert: 4096·6·1024·512 FLOPs = 12.9 µs at 1 PFLOP/s; bytes 3.1 MB + 16.8 MB = 5.9 µs
    t = compute_time(np.array([4096.0]), np.array([1.0]), SHAPE, HW)
    assert t == pytest.approx(4096 * 6 * 1024 * 512 / 1e15)


def test_link_latency_only_when_something_moves():
    hw = Hardware(intra_gbps=450.0, inter_gbps=50.0, tflops=1000.0, hbm_gbps=3350.0, link_latency_us=3.0)
    z = np.zeros(2)
    assert comm_time(z, z, z, z, hw) == 0.0
    assert comm_time(np.array([0.0, 2048.0]), z, z, z, hw) == pytest.approx(2048 / 50e9 + 3e-6)


def test_migration_time_is_the_slowest_receiver():
    mb = SHAPE.expert_bytes
    assert mb == 3 * 1024 * 512 * 2
    t = migration_time(np.array([mb, 0.0]), np.array([0.0, 3 * mb]), HW)
    assert t == pytest.approx(max(mb / 50e9, 3 * mb / 450e9))


def test_presets_and_overrides():
    hw = hardware("h200", "nvlink4", "roce400")
    assert (hw.tflops, hw.hbm_gbps, hw.intra_gbps, hw.inter_gbps) == (989.0, 4800.0, 450.0, 50.0)
    hw = hardware(inter_gbps=42.0)
    assert hw.inter_gbps == 42.0 and "42 GB/s" in hw.name
    with pytest.raises(UsageError, match="--gpu 'a100': choose one of h100, h200"):
        hardware("a100")
    with pytest.raises(UsageError, match="--link-latency-us must be 0 or more"):
        hardware(link_latency_us=-1)
