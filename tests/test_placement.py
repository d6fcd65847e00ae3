"""Placement and simulation: a hand-computed simulator case, EPLB's README answer, policy invariants,
the held-out split, placement.json and engine exports, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeprof.errors import PlacementError, UsageError
from moeprof.placement import eplb
from moeprof.placement.data import TokenRows, load_routing, split_requests
from moeprof.placement.export import EXPORTERS, deepseek_eplb, sglang_init_expert_location, trtllm_load_balancer
from moeprof.placement.plan import read_placement, validate_placement_dict, write_placement
from moeprof.placement.policies import POLICIES, FitInput
from moeprof.placement.run import fit_policy, score, sim_config
from moeprof.placement.simulate import SimConfig, simulate
from moeprof.placement.topology import Topology, build_topology
from moeprof.synthetic import generate_trace
from moeprof.trace import Trace


# -- the simulator, by hand ---------------------------------------------------------------------------
def _hand_rows() -> TokenRows:
    # request 0 is served by node 0 (source GPU 0), request 1 by node 1 (source GPU 2)
    return TokenRows(
        request=np.array([0, 1, 0, 1]),
        step=np.array([1, 1, 2, 2]),
        token=np.array([0, 1, 2, 3]),
        layer=np.zeros(4, dtype=np.int64),
        experts=np.array([[1, 2], [0, 1], [0, 3], [2, 3]]),
    )


def test_simulator_hand_computed_traffic():
    # 2 nodes × 2 GPUs × 1 slot, expert e on GPU e; hidden 4 × 2 bytes -> 16 bytes per crossing both ways
    topo = Topology(2, 2, 1, 4)
    cfg = SimConfig(hidden_size=4, dtype_bytes=2, batch_size=4, capacity_batch_sizes=(4,), node_limits=(1,))
    m = simulate(_hand_rows(), np.array([[0, 1, 2, 3]]), topo, np.array([0, 1]), cfg)
    # token 0 (GPU 0 -> experts 1, 2): node 1 once over the network, landing on its entry GPU 2;
    #   GPU 1 by NVLink                                                -> 1 remote node, 1 NVLink
    # token 1 (GPU 2 -> experts 0, 1): node 0 once, lands on GPU 0 (entry), NVLink to GPU 1 -> 1, 1
    # token 2 (GPU 0 -> experts 0, 3): GPU 0 is the source; node 1 once, lands on GPU 2, NVLink to 3 -> 1, 1
    # token 3 (GPU 2 -> experts 2, 3): own node only, GPU 2 is the source, NVLink to 3   -> 0, 1
    assert m["tokens"] == 4 and m["token_routes"] == 8
    assert m["cross_node_bytes_per_token"] == 3 * 16 / 4
    assert m["intra_node_bytes_per_token"] == 4 * 16 / 4
    assert m["local_node_share"] == 4 / 8
    assert m["local_gpu_share"] == 2 / 8
    assert m["node_limit"] == {"1": 0.5}
    assert m["gpu_load_max_mean"]["median"] == 1.0  # every GPU gets 2 routes


def test_simulator_dedups_per_node_and_prefers_local_copies():
    # one token to two experts on the same remote node: one network crossing, not two
    topo = Topology(2, 2, 1, 4)
    rows = TokenRows(np.array([0]), np.array([1]), np.array([0]), np.array([0]), np.array([[2, 3]]))
    cfg = SimConfig(hidden_size=4, dtype_bytes=2, batch_size=1, capacity_batch_sizes=(1,))
    m = simulate(rows, np.array([[0, 1, 2, 3]]), topo, np.array([0]), cfg)
    assert m["cross_node_bytes_per_token"] == 16  # node 1 once
    assert m["intra_node_bytes_per_token"] == 16  # lands on GPU 2 (entry), NVLink to GPU 3
    # every node holds every expert: nothing crosses the network
    topo2 = Topology(2, 2, 2, 4)
    m2 = simulate(_hand_rows(), np.array([[0, 1, 2, 3, 0, 1, 2, 3]]), topo2, np.array([0, 1]), cfg)
    assert m2["cross_node_bytes_per_token"] == 0 and m2["local_node_share"] == 1.0


def test_capacity_drops_and_needed_factor():
    # 4 tokens, k=2, 4 slots: B·k/P = 2 routes per slot on average; GPU 0..3 get 2 each -> no drops at cf 1
    topo = Topology(2, 2, 1, 4)
    cfg = SimConfig(hidden_size=1, dtype_bytes=1, batch_size=4, capacity_batch_sizes=(4,), capacity_factors=(0.5, 1.0),
                    min_capacity=0)
    cap = simulate(_hand_rows(), np.array([[0, 1, 2, 3]]), topo, np.array([0, 1]), cfg)["capacity"][0]
    assert [g["dropped_share"] for g in cap["grid"]] == [0.5, 0.0]
    # drops of (2 - c) on each of 4 slots out of 8 routes stay <= 1% down to c = 1.98, i.e. factor 0.99
    assert cap["capacity_factor_for_max_drop"] == pytest.approx(0.99, abs=1e-6)


# -- EPLB ---------------------------------------------------------------------------------------------
README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def test_eplb_readme_example():
    phy2log, log2phy, logcnt = eplb.rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert logcnt[0].tolist() == [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]


@pytest.mark.parametrize("groups,nodes,gpus,extra", [(4, 2, 8, 8), (1, 2, 4, 4), (8, 4, 8, 0), (3, 2, 4, 0)])
def test_eplb_invariants(groups, nodes, gpus, extra):
    rng = np.random.default_rng(groups * 7 + gpus)
    E = 24
    w = rng.integers(0, 500, size=(3, E)).astype(float)
    P = E + extra
    phy2log, log2phy, logcnt = eplb.rebalance_experts(w, P, groups, nodes, gpus)
    assert phy2log.shape == (3, P)
    for layer in range(3):
        assert set(phy2log[layer]) == set(range(E))  # every logical expert placed
        assert logcnt[layer].sum() == P  # replica counts sum to the slots
        assert np.array_equal(np.bincount(phy2log[layer], minlength=E), logcnt[layer])
        for e in range(E):
            slots = log2phy[layer, e][log2phy[layer, e] >= 0]
            assert len(slots) == logcnt[layer, e] and all(phy2log[layer, s] == e for s in slots)
        if groups % nodes == 0:  # hierarchical: a group's experts stay on one node
            node = np.arange(P) // (P // nodes)
            for g in range(groups):
                members = range(g * E // groups, (g + 1) * E // groups)
                assert len({int(node[s]) for e in members for s in log2phy[layer, e] if s >= 0}) == 1


def test_balanced_packing_equal_counts_and_greedy_order():
    pack, rank = eplb.balanced_packing(np.array([[10.0, 9, 8, 1]]), 2)
    assert pack.tolist() == [[0, 1, 1, 0]] and sorted(rank[0].tolist()) == [0, 0, 1, 1]


# -- topology -------------------------------------------------------------------------------------------
def test_topology_options():
    assert build_topology(8, 2, 2).slots_per_gpu == 2
    assert build_topology(8, 2, 2, redundant=4).num_slots == 12
    with pytest.raises(PlacementError, match="fewer than the model's 8 experts; use --slots-per-gpu 2"):
        build_topology(8, 2, 2, slots_per_gpu=1)
    with pytest.raises(PlacementError, match="use --redundant 4"):
        build_topology(8, 2, 2, redundant=3)
    with pytest.raises(UsageError, match="not both"):
        build_topology(8, 2, 2, slots_per_gpu=2, redundant=4)


# -- policies on a planted trace ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    out = tmp_path_factory.mktemp("placement") / "trace"
    generate_trace(out, num_requests=48, num_layers=2, num_experts=16, top_k=2, prompt_tokens=(8, 16),
                   decode_tokens=(8, 16), first_moe_layer=1, hidden_size=64, seed=3)
    return out


@pytest.fixture(scope="module")
def data(trace):
    return load_routing(Trace.open(trace))


def test_split_is_seeded_and_never_overlaps():
    a, b = split_requests(100, 0.3, 0), split_requests(100, 0.3, 0)
    assert np.array_equal(a, b) and a.sum() == 30
    assert not np.array_equal(a, split_requests(100, 0.3, 1))
    train = set(np.flatnonzero(~a)); test = set(np.flatnonzero(a))
    assert not train & test and len(train | test) == 100


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("redundant", [0, 8])
def test_policy_invariants(data, policy, redundant):
    topo = build_topology(16, 2, 2, redundant=redundant)
    test = split_requests(data.num_requests, 0.3, 0)
    p = fit_policy(data, ~test, topo, policy)
    assert p.phy2log.shape == (2, topo.num_slots)
    for row in p.phy2log:
        assert set(row) == set(range(16))  # every logical expert placed, every slot filled
    assert (p.logcnt.sum(1) == topo.num_slots).all()
    if redundant == 0:
        assert (p.logcnt == 1).all()
    m = score(data, p, test, sim_config(data, hidden_size=None, dtype_bytes=None)[0])
    assert m["requests"] == test.sum() and m["tokens"] > 0
    assert 0 <= m["local_node_share"] <= 1 and m["gpu_load_max_mean"]["median"] >= 1


def test_locality_respects_its_load_bound_on_train(data):
    topo = build_topology(16, 2, 2, redundant=8)
    p = fit_policy(data, ~split_requests(data.num_requests, 0.3, 0), topo, "locality")
    assert p.info["layers_over_bound"] == 0
    assert p.grouping.kind == "prefill" and p.grouping.centroids.shape == (2, 2 * 16)


def test_policy_is_a_pure_function_of_counts():
    topo = Topology(2, 1, 2, 4)
    fit = FitInput(load=np.array([[[6, 1, 1, 4]]]), prefill=np.ones((1, 1, 4)), domains=np.array(["x"]), topology=topo)
    assert POLICIES["linear"](fit).phy2log.tolist() == [[0, 1, 2, 3]]
    assert POLICIES["round_robin"](fit).phy2log.tolist() == [[0, 2, 1, 3]]
    assert POLICIES["eplb"](fit).phy2log.tolist() == [[0, 2, 3, 1]]  # loads 7 | 5
    fit.topology = Topology(2, 1, 3, 4)  # 2 redundant slots: experts 0 and 3 get a second copy, loads 6 | 6
    assert POLICIES["eplb"](fit).phy2log.tolist() == [[0, 3, 1, 0, 3, 2]]


# -- placement.json and exports -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def placement(data):
    topo = build_topology(16, 2, 2, redundant=8)
    test = split_requests(data.num_requests, 0.3, 0)
    p = fit_policy(data, ~test, topo, "locality")
    p.metrics = score(data, p, test, SimConfig(hidden_size=64))
    return p


def test_placement_json_round_trip_and_schema(placement, tmp_path):
    path = write_placement(placement, tmp_path / "p.json")
    d = json.loads(path.read_text())
    validate_placement_dict(d, "p.json")
    assert d["moe_layers"] == [1, 2] and len(d["physical_to_logical_map"][0]) == 24
    assert len(d["logical_to_physical_map"][0]) == 16 and min(min(x) for x in d["logical_to_physical_map"][0]) >= -1
    back = read_placement(path)
    assert np.array_equal(back.phy2log, placement.phy2log)
    assert back.grouping.centroids.shape == placement.grouping.centroids.shape
    del d["physical_to_logical_map"]
    path.write_text(json.dumps(d))
    with pytest.raises(PlacementError, match="p.json: not a valid placement file at \\(top level\\): 'physical_to_logical_map' is a required property"):
        read_placement(path)


def test_exports(placement, tmp_path):
    sg = sglang_init_expert_location(placement)
    assert list(sg) == ["physical_to_logical_map"]  # SGLang passes the keys to init_by_mapping
    rows = sg["physical_to_logical_map"]
    assert len(rows) == 3  # every transformer layer; layer 0 is dense
    assert rows[0] == [p % 16 for p in range(24)] and rows[1] == placement.phy2log[0].tolist()
    trt = trtllm_load_balancer(placement)
    assert set(trt) == {"num_slots", "initial_global_assignments", "layer_updates_per_iter"}
    assert list(trt["initial_global_assignments"]) == [1, 2] and trt["num_slots"] == 24
    yaml = pytest.importorskip("yaml")
    text = EXPORTERS["trtllm"].render(trt)
    assert yaml.safe_load(text) == trt
    ds = deepseek_eplb(placement)
    assert np.asarray(ds["phy2log"]).shape == (2, 24) and np.asarray(ds["logcnt"]).sum() == 48


# -- CLI ----------------------------------------------------------------------------------------------
def test_cli_place_simulate_and_compare(cli, trace, tmp_path):
    out = tmp_path / "p.json"
    r = cli("place", trace, "-n", "2", "-g", "2", "--redundant", "8", "--policy", "locality", "--out", out,
            "--export", "sglang", "--export", "trtllm")
    assert r.exit_code == 0, r.stderr
    assert out.exists() and (tmp_path / "p.sglang.json").exists() and (tmp_path / "p.trtllm.yaml").exists()
    r = cli("place", trace, "-n", "2", "-g", "2", "--policy", "eplb", "--out", out)
    assert r.exit_code == 2 and r.stderr.strip() == f"Error: {out}: exists; pass --force to replace it"
    r = cli("simulate", trace, "--placement", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["tokens"] > 0
    r = cli("simulate", trace, "--compare", "-n", "2", "-g", "2", "--out", tmp_path / "cmp")
    assert r.exit_code == 0, r.stderr
    for name in ("compare.json", "compare.png", "compare.svg", "placement-locality.json"):
        assert (tmp_path / "cmp" / name).exists()
    keys = [row["key"] for row in json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]]
    assert keys == ["linear", "round_robin", "eplb", "kmeans", "locality", "locality+domain"]


def test_cli_errors(cli, trace, tmp_path):
    r = cli("place", trace, "-n", "1", "-g", "2", "--slots-per-gpu", "1", "--policy", "eplb", "--out", tmp_path / "x.json")
    assert r.exit_code == 2
    assert r.stderr.strip() == ("Error: 1 nodes × 2 GPUs × 1 slots = 2 expert slots per layer, fewer than the "
                                "model's 16 experts; use --slots-per-gpu 8 or more GPUs")
    r = cli("place", trace, "-n", "2", "-g", "2", "--policy", "greedy", "--out", tmp_path / "x.json")
    assert r.exit_code == 2
    assert r.stderr.strip() == "Error: unknown policy 'greedy'; choose one of linear, round_robin, eplb, kmeans, locality"
    r = cli("simulate", trace, "--placement", tmp_path / "nope.json")
    assert r.exit_code == 2
    assert r.stderr.strip() == f"Error: {tmp_path / 'nope.json'}: no such placement file; write one with `moeprof place`"
    r = cli("simulate", trace)
    assert r.exit_code == 2
    assert r.stderr.strip() == ("Error: give one of --placement FILE, --compare or --timeline (the last two with "
                                "--nodes and --gpus-per-node)")
    r = cli("place", trace, "-n", "2", "-g", "2", "--policy", "eplb", "--export", "vllm", "--out", tmp_path / "x.json")
    assert r.stderr.strip() == "Error: unknown export format 'vllm'; choose one of sglang, trtllm, deepseek, vllm-ascend"


def test_place_help_lists_the_registry(cli):
    r = cli("place", "--help")
    assert r.exit_code == 0
    assert all(name in r.stdout for name in POLICIES) and "sglang, trtllm, deepseek" in r.stdout


def test_prefill_grouping_needs_prefill_rows(tmp_path):
    from moeprof.trace import ModelInfo, TraceWriter

    out = tmp_path / "decode-only"
    with TraceWriter(out, model=ModelInfo(name="m", num_experts=4, top_k=1, moe_layers=[0]), source="hf") as w:
        for r in range(4):
            w.set_request(r, "x", prompt_tokens=1, decode_tokens=1)
            w.write_routing(dict(request_id=r, step=1, phase="decode", pos=1, layer=0, experts=[[r]]))
    d = load_routing(Trace.open(out))
    with pytest.raises(PlacementError, match="--grouping prefill needs prefill routing rows"):
        fit_policy(d, np.array([True, True, True, False]), build_topology(4, 2, 1), "eplb", grouping="prefill")
