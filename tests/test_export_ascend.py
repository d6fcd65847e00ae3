"""`place --export vllm-ascend`: the expert map vllm-ascend reads from expert_map_path, checked the way it reads it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeprof.errors import PlacementError
from moeprof.placement.export import EXPORTERS, vllm_ascend_expert_map
from moeprof.placement.grouping import GroupingModel
from moeprof.placement.plan import Placement
from moeprof.placement.topology import Topology


def _placement(phy2log) -> Placement:
    # 1 node x 2 devices x 3 slots for 4 experts (2 redundant), MoE layers 1 and 3 of the model.
    return Placement(Topology(1, 2, 3, 4), "hand", [1, 3], np.asarray(phy2log), GroupingModel("random", 1))


def _as_vllm_ascend_reads_it(d: dict) -> tuple[np.ndarray, int, int]:
    """ExpertLoadBalancer._expert_file_to_tensor: [layers][devices][slots] as one int tensor."""
    tensor = np.array([[dev["device_expert"] for dev in layer["device_list"]] for layer in d["layer_list"]], np.int32)
    return tensor, d["moe_layer_count"], d["layer_list"][0]["device_count"]


def test_known_answer_and_the_engine_side_maps():
    p = _placement([[0, 1, 2, 3, 0, 1], [3, 2, 0, 1, 0, 2]])
    d = json.loads(EXPORTERS["vllm-ascend"].render(vllm_ascend_expert_map(p)))
    assert d == {
        "moe_layer_count": 2,
        "layer_list": [
            {"layer_id": 0, "device_count": 2, "device_list": [
                {"device_id": 0, "device_expert": [0, 1, 2]}, {"device_id": 1, "device_expert": [3, 0, 1]}]},
            {"layer_id": 1, "device_count": 2, "device_list": [
                {"device_id": 0, "device_expert": [3, 2, 0]}, {"device_id": 1, "device_expert": [1, 0, 2]}]},
        ],
    }
    tensor, layers, ranks = _as_vllm_ascend_reads_it(d)
    assert tensor.shape == (2, 2, 3) and (layers, ranks) == (2, 2)
    # generate_expert_placement_map: [layer, rank, expert] -> local index or -1; every expert somewhere.
    placement_map = np.full((2, 2, 4), -1)
    for lay in range(2):
        for rank in range(2):
            placement_map[lay, rank, tensor[lay, rank]] = np.arange(3)
    assert placement_map[1, 0].tolist() == [2, -1, 1, 0]
    assert ((placement_map >= 0).sum(axis=1) >= 1).all()
    # get_global_redundant_expert_num = slots per device x devices - experts
    assert len(tensor[0][0]) * ranks - 4 == 2


def test_one_expert_twice_on_a_device_is_refused():
    p = _placement([[0, 0, 1, 2, 3, 1], [0, 1, 2, 3, 0, 1]])
    with pytest.raises(PlacementError, match="layer 1 puts expert 0 twice on device 0"):
        vllm_ascend_expert_map(p)


def test_cli_place_writes_the_vllm_ascend_map(cli, tmp_path):
    from pathlib import Path

    trace = Path(__file__).resolve().parents[1] / "sample_data" / "trace"
    out = tmp_path / "p.json"
    r = cli("place", trace, "-n", "1", "-g", "4", "--policy", "eplb", "--out", out, "--export", "vllm-ascend")
    assert r.exit_code == 0, r.stderr
    d = json.loads((tmp_path / "p.vllm-ascend.json").read_text())
    placement = json.loads(out.read_text())
    tensor, layers, ranks = _as_vllm_ascend_reads_it(d)
    assert layers == len(placement["moe_layers"]) and ranks == 4
    assert tensor.reshape(layers, -1).tolist() == placement["physical_to_logical_map"]


def test_a_refused_export_writes_nothing(cli, tmp_path, monkeypatch):
    from pathlib import Path

    from moeprof.placement import export

    def refuse(p):
        raise PlacementError("vllm-ascend export: layer 1 puts expert 0 twice on device 0")

    monkeypatch.setitem(export.EXPORTERS, "vllm-ascend", export.Exporter(refuse, export._json, ".vllm-ascend.json"))
    trace = Path(__file__).resolve().parents[1] / "sample_data" / "trace"
    out = tmp_path / "p.json"
    r = cli("place", trace, "-n", "1", "-g", "4", "--policy", "eplb", "--out", out, "--export", "vllm-ascend")
    assert r.exit_code == 2 and "twice on device 0" in r.stderr
    assert list(tmp_path.iterdir()) == []
