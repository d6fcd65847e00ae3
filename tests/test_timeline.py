"""Placement over time: a trace whose popularity flips halfway, migration bytes, the time order, the
hops behind the traffic matrix, the rank cost matrix, the CLI; then the real Llama-4 trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeprof.errors import PlacementError, UsageError
from moeprof.placement.data import TokenRows, load_routing
from moeprof.placement.latency import Hardware
from moeprof.placement.simulate import SimConfig, simulate
from moeprof.placement.replay import migration, pass_of_rows
from moeprof.placement.timeline import timeline
from moeprof.placement.topology import Topology
from moeprof.placement.traffic import (
    choose_slots,
    default_rank_cost,
    dispatch_hops,
    load_rank_cost_matrix,
    prefer_cheap_links,
    traffic_matrix,
)
from moeprof.trace import ModelInfo, Trace, TraceWriter

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"

# -- the flip: experts 0 and 1 are hot in the first half, 0 and 2 in the second ----------------------
T = 60  # passes per half
N = 10  # rebalance interval = window


def _flip_trace(path: Path, batch_id: bool = True) -> Path:
    """4 requests decode 2T steps together (one pass per step). First half: requests route to experts
    [0, 0, 1, 1] (loads 2, 2, 0, 0); second half: [0, 2, 0, 2] (loads 2, 0, 2, 0)."""
    model = ModelInfo(name="flip", num_experts=4, top_k=1, moe_layers=[0], hidden_size=1024, dtype="bfloat16")
    with TraceWriter(path, model=model, source="hf") as w:
        for r in range(4):
            w.set_request(r, "x", prompt_tokens=1, decode_tokens=2 * T)
        steps = np.arange(1, 2 * T + 1)
        for r in range(4):
            e = np.where(steps <= T, [0, 0, 1, 1][r], [0, 2, 0, 2][r])
            w.write_routing(dict(request_id=r, step=steps, phase="decode", pos=steps, layer=0,
                                 experts=e[:, None], batch_id=(steps - 1) if batch_id else None))
    return path


# FLOP-bound compute (HBM and links so fast they round away): a pass costs busiest GPU routes × 6·h·I / F
FAST = Hardware(intra_gbps=1e6, inter_gbps=1e6, tflops=1.0, hbm_gbps=1e9)
ROUTE_S = 6 * 1024 * 512 / 1e12


@pytest.fixture(scope="module")
def flip(tmp_path_factory):
    path = _flip_trace(tmp_path_factory.mktemp("flip") / "trace")
    return timeline(path, nodes=1, gpus_per_node=2, hw=FAST, policies=["linear", "eplb"], every=[N],
                    moe_intermediate_size=512, report_windows=12)


def test_flip_busiest_gpu_by_hand(flip):
    rows = {r["key"]: r for r in flip["rows"]}
    assert list(rows) == ["linear · static", "eplb · once after 10", "eplb · every 10"]
    # linear holds {0, 1} | {2, 3}: busiest 4 in the first half, 2 in the second
    assert rows["linear · static"]["busiest_load"] == pytest.approx(3.0)
    # EPLB fitted on the first half holds {0, 2} | {1, 3}: busiest 2 there, 4 after the flip
    assert rows["eplb · once after 10"]["busiest_load"] == pytest.approx((4 * N + 2 * (T - N) + 4 * T) / (2 * T))
    # every N: linear until N, first-half placement until T + N, second-half placement after
    assert rows["eplb · every 10"]["busiest_load"] == pytest.approx((4 * T + 4 * N) / (2 * T))


def test_flip_migrations_are_experts_moved_times_size(flip):
    every = next(r for r in flip["rows"] if r["key"] == "eplb · every 10")
    expert_bytes = 3 * 1024 * 512 * 2
    assert flip["expert"]["expert_bytes"] == expert_bytes
    assert every["rebalances"] == 2 * T // N - 1
    moved = [p for p in every["rebalance_points"] if p["experts_moved"]]
    # [0,1 | 2,3] -> [0,2 | 1,3] at pass N, back at pass T + N: one expert lands on each GPU each time
    assert [(p["at_pass"], p["experts_moved"]) for p in moved] == [(N, 2), (T + N, 2)]
    assert every["migration_bytes"] == 4 * expert_bytes
    assert every["migration_seconds"] == pytest.approx(2 * expert_bytes / 1e15)


def test_flip_periodic_rebalancing_wins_by_the_computed_margin(flip):
    rows = {r["key"]: r for r in flip["rows"]}
    mig = rows["eplb · every 10"]["migration_seconds"]
    static_us = 3.0 * ROUTE_S * 1e6
    # migrations at their steady-state rate: the mean rebalance (2T/N - 1 of them) every N passes
    every_us = ((4 * T + 4 * N) / (2 * T) * ROUTE_S + mig / (2 * T // N - 1) / N) * 1e6
    assert rows["linear · static"]["us_per_step"] == pytest.approx(static_us, rel=1e-6)
    assert rows["eplb · every 10"]["us_per_step"] == pytest.approx(every_us, rel=1e-6)
    assert rows["eplb · every 10"]["vs_default"]["step_time"] == pytest.approx(every_us / static_us - 1, rel=1e-5)
    assert rows["eplb · once after 10"]["us_per_step"] > static_us  # the static profile loses after the flip
    assert rows["eplb · once after 10"]["migration_us_per_step"] == 0.0
    # two experts move, one onto each GPU, in parallel: one expert's bytes over the link
    assert rows["eplb · once after 10"]["migration_one_time_s"] == pytest.approx(3 * 1024 * 512 * 2 / 1e15)
    assert flip["best"] == "eplb · every 10"
    assert flip["verdict"].startswith("On this trace and 1 × 2 GPUs, eplb · every 10 gives the lowest")
    assert "-22.2%" in flip["verdict"] and "2 rebalances" not in flip["verdict"]


def test_flip_windows_show_the_flip(flip):
    static = flip["rows"][0]["windows"]
    assert flip["report_every"] == 10 and len(static) == 12
    assert [w["busiest_load"] for w in static] == [4.0] * 6 + [2.0] * 6
    every = flip["rows"][2]["windows"]
    assert [w["busiest_load"] for w in every] == [4.0] + [2.0] * 5 + [4.0] + [2.0] * 5
    assert [w["migration_bytes"] > 0 for w in every] == [False, True] + [False] * 5 + [True] + [False] * 4


def test_time_order_without_batch_id(tmp_path):
    # requests of 3, 2 and 1 decode steps, at most 2 in flight: request 2 enters when request 1 leaves
    model = ModelInfo(name="m", num_experts=2, top_k=1, moe_layers=[0])
    with TraceWriter(tmp_path / "t", model=model, source="hf") as w:
        for r, n in enumerate([3, 2, 1]):
            w.set_request(r, "x", prompt_tokens=1, decode_tokens=n)
            s = np.arange(1, n + 1)
            w.write_routing(dict(request_id=r, step=s, phase="decode", pos=s, layer=0, experts=np.zeros((n, 1))))
    opened = Trace.open(tmp_path / "t")
    data = load_routing(opened)
    passes, how = pass_of_rows(opened, data, concurrency=2)
    got = sorted(zip(data.rows.request.tolist(), data.rows.step.tolist(), passes.tolist()))
    assert got == [(0, 1, 0), (0, 2, 1), (0, 3, 2), (1, 1, 0), (1, 2, 1), (2, 1, 2)]
    assert "at most 2 at a time" in how
    with pytest.raises(UsageError, match="--concurrency must be at least 1"):
        pass_of_rows(opened, data, concurrency=0)


def test_migration_splits_nvlink_and_network():
    # 2 nodes × 1 GPU × 2 slots; old [0,1 | 2,3], new [0,2 | 1,3]: GPU 0 gets 2, GPU 1 gets 1, both
    # over the network (no other GPU on their node held them); reordering a GPU's slots moves nothing
    topo = Topology(2, 1, 2, 4)
    m = migration(np.array([[0, 1, 2, 3]]), np.array([[2, 0, 1, 3]]), topo, 100)
    assert (m["experts_moved"], m["bytes"], m["network_bytes"], m["nvlink_bytes"]) == (2, 200, 200, 0)
    assert migration(np.array([[0, 1, 2, 3]]), np.array([[1, 0, 3, 2]]), topo, 100)["experts_moved"] == 0
    # 1 node × 2 GPUs: the same change crosses NVLink
    m = migration(np.array([[0, 1, 2, 3]]), np.array([[2, 0, 1, 3]]), Topology(1, 2, 2, 4), 100)
    assert (m["nvlink_bytes"], m["network_bytes"]) == (200, 0)


# -- hops and the traffic matrix --------------------------------------------------------------------
def test_hops_add_up_to_the_simulator_bytes():
    rng = np.random.default_rng(3)
    topo = Topology(2, 4, 3, 20)  # 24 slots: 4 redundant
    phy2log = np.stack([rng.permutation(np.arange(24) % 20) for _ in range(2)])
    n, k = 400, 4
    experts = np.stack([rng.choice(20, k, replace=False) for _ in range(n)])
    rows = TokenRows(request=np.arange(n) % 10, step=np.arange(n) // 10, token=np.arange(n) // 2,
                     layer=np.arange(n) % 2, experts=experts)
    node = np.arange(10) % 2
    cfg = SimConfig(hidden_size=8, dtype_bytes=2, batch_size=16, capacity_batch_sizes=(16,), node_limits=(1,))
    m = simulate(rows, phy2log, topo, node, cfg)
    from moeprof.placement.simulate import source_gpus

    src = source_gpus(node, topo)[rows.request]
    slot = choose_slots(phy2log, topo, rows.layer, src, rows.experts, rows.token)
    hops = dispatch_hops(src, slot // topo.slots_per_gpu, topo)
    mat = traffic_matrix(hops, topo.num_gpus, 16, rows.num_tokens)
    same = (np.arange(8)[:, None] // 4) == (np.arange(8)[None, :] // 4)
    assert mat[~same].sum() == pytest.approx(m["cross_node_bytes_per_token"])
    assert mat[same].sum() == pytest.approx(m["intra_node_bytes_per_token"])
    assert np.allclose(mat, mat.T) and np.all(np.diag(mat) == 0)


def test_hops_of_the_worked_example():
    # 2 nodes × 2 GPUs: a token on GPU 0 routed to GPUs {1, 2}: 0 -> 1 over NVLink, 0 -> 2 over the network
    h = dispatch_hops(np.array([0]), np.array([[1, 2]]), Topology(2, 2, 1, 4))
    assert sorted(zip(h.a.tolist(), h.b.tolist(), h.network.tolist())) == [(0, 1, False), (0, 2, True)]
    # a token on GPU 1 routed to GPUs {2, 3} on node 1: one network hop to GPU 3 (local index 1), then 3 -> 2
    h = dispatch_hops(np.array([1]), np.array([[2, 3]]), Topology(2, 2, 1, 4))
    assert sorted(zip(h.a.tolist(), h.b.tolist(), h.network.tolist())) == [(1, 3, True), (3, 2, False)]


# -- rank cost matrix -------------------------------------------------------------------------------
def test_rank_cost_matrix_file(tmp_path):
    good = tmp_path / "topo.json"
    good.write_text(json.dumps({"rank_cost_matrix": [[0, 1], [1, 0]]}))
    assert load_rank_cost_matrix(good, 2).tolist() == [[0.0, 1.0], [1.0, 0.0]]
    bare = tmp_path / "bare.json"
    bare.write_text("[[0, 2], [2, 0]]")
    assert load_rank_cost_matrix(bare, 2)[0, 1] == 2.0
    cases = [
        ({"costs": [[0]]}, 1, 'no "rank_cost_matrix" key'),
        ({"rank_cost_matrix": [[0, 1]]}, 2, "must be square"),
        ({"rank_cost_matrix": [[0, 1], [1, 0]]}, 4, "has 2 ranks, the topology has 4 GPUs"),
        ({"rank_cost_matrix": [[1, 1], [1, 0]]}, 2, "diagonal must be zero"),
        ({"rank_cost_matrix": [[0, -1], [1, 0]]}, 2, "finite and non-negative"),
    ]
    for i, (body, n, msg) in enumerate(cases):
        f = tmp_path / f"bad{i}.json"
        f.write_text(json.dumps(body))
        with pytest.raises(PlacementError, match=msg):
            load_rank_cost_matrix(f, n)
    with pytest.raises(PlacementError, match="cannot read the rank cost matrix"):
        load_rank_cost_matrix(tmp_path / "missing.json", 2)


def test_prefer_cheap_links_moves_experts_to_their_senders():
    # SGLang's test case: experts 0, 1 are used by rank 1, experts 2, 3 by rank 0; linear puts them the
    # other way round. Swaps bring each pair home without changing the ranks' loads.
    topo = Topology(2, 1, 2, 4)
    src = np.zeros((2, 1, 4))
    src[0, 0, 2:] = 10
    src[1, 0, :2] = 10
    out, info = prefer_cheap_links(np.array([[0, 1, 2, 3]]), src, default_rank_cost(topo), topo)
    assert sorted(out[0, :2].tolist()) == [2, 3] and sorted(out[0, 2:].tolist()) == [0, 1]
    assert info["cost_before"] == 400.0 and info["cost_after"] == 0.0 and info["swaps"] == 2


def test_prefer_cheap_links_never_raises_the_busiest_gpu():
    rng = np.random.default_rng(0)
    topo = Topology(2, 2, 4, 16)
    src = rng.integers(0, 50, size=(4, 3, 16)).astype(float)
    phy2log = np.stack([rng.permutation(16) for _ in range(3)])
    out, info = prefer_cheap_links(phy2log, src, default_rank_cost(topo), topo)
    load = src.sum(0)
    for layer in range(3):
        before = np.bincount(np.arange(16) // 4, weights=load[layer][phy2log[layer]]).max()
        after = np.bincount(np.arange(16) // 4, weights=load[layer][out[layer]]).max()
        assert after <= before + 1e-9
        assert sorted(out[layer].tolist()) == list(range(16))
    assert info["cost_after"] <= info["cost_before"]


# -- the CLI ------------------------------------------------------------------------------------------
def test_cli_timeline(cli, tmp_path):
    trace = _flip_trace(tmp_path / "trace")
    out = tmp_path / "tl"
    r = cli("simulate", trace, "--timeline", "-n", "1", "-g", "2", "--rebalance-every", "10",
            "--moe-intermediate-size", "512", "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "eplb · every 10 gives the lowest predicted MoE time per decode step" in " ".join(r.stdout.split())
    assert (out / "timeline.json").is_file() and (out / "timeline.png").is_file() and (out / "traffic.png").is_file()
    d = json.loads((out / "timeline.json").read_text())
    assert d["best"] == "eplb · every 10"
    r = cli("simulate", trace, "--timeline", "-n", "1", "-g", "2", "--out", out)
    assert r.exit_code == 2 and "already holds a timeline; pass --force" in r.stderr


def test_cli_timeline_needs_the_expert_size(cli, tmp_path):
    trace = _flip_trace(tmp_path / "trace")
    r = cli("simulate", trace, "--timeline", "-n", "1", "-g", "2", "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert "does not record the experts' intermediate size; pass --moe-intermediate-size" in r.stderr
    assert not (tmp_path / "o").exists()


# -- real data ----------------------------------------------------------------------------------------
def test_sample_trace_timeline():
    root = Path(__file__).resolve().parents[1]
    d = timeline(root / "sample_data" / "trace", nodes=2, gpus_per_node=4, hw=Hardware(),
                 moe_intermediate_size=96)
    assert "batch_id" in d["time_order"]
    base = d["rows"][0]
    assert base["key"] == "linear · static" and base["rebalances"] == 0
    eplb_rows = [r for r in d["rows"] if r["policy"] == "eplb"]
    # EPLB balances: every schedule of it leaves the busiest GPU lighter than linear does
    assert all(r["load_max_mean"] < base["load_max_mean"] for r in eplb_rows)
    assert d["verdict"].startswith("On this trace and 2 × 4 GPUs")
    mat = np.asarray(d["traffic_matrices"][base["key"]])
    assert mat.shape == (8, 8)
    assert mat.sum() == pytest.approx(base["cross_node_bytes_per_token"] + base["intra_node_bytes_per_token"])


def test_report_shows_the_timeline_and_its_verdict(cli, tmp_path):
    trace = _flip_trace(tmp_path / "trace")
    out = tmp_path / "tl"
    assert cli("simulate", trace, "--timeline", "-n", "1", "-g", "2", "--rebalance-every", "10",
               "--moe-intermediate-size", "512", "--out", out).exit_code == 0
    r = cli("report", out, "-o", tmp_path / "report")
    assert r.exit_code == 0, r.stderr
    md = (tmp_path / "report" / "summary.md").read_text()
    verdict = json.loads((out / "timeline.json").read_text())["verdict"]
    assert "### Placement over time" in md and verdict in md
    assert "| eplb · every 10 |" in md
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Load, cross-node traffic and predicted step time over time" in html
    assert "Rank × rank traffic, bytes per token" in html


@pytest.mark.skipif(not (REALDATA / "llama4_maverick_mmlu" / "routing.csv.gz").is_file(),
                    reason="../shared/realdata/llama4_maverick_mmlu is not here")
def test_llama4_maverick_timeline(tmp_path):
    """40 requests of the real Llama-4-Maverick trace (SGLang, top-1 of 128, 24 MoE layers), converted
    with moeprof's writer, replayed on 2 × 8 GPUs at Maverick's dimensions."""
    import polars as pl

    df = pl.read_csv(REALDATA / "llama4_maverick_mmlu" / "routing.csv.gz",
                     schema_overrides={"expert_ids": pl.String, "decode_step": pl.Int64, "token_idx": pl.Int64})
    df = df.filter(pl.col("request_id") < 40).with_columns(
        pl.when(pl.col("phase") == "prefill").then(0).otherwise(pl.col("decode_step") + 1).alias("step"),
        pl.col("expert_ids").str.split(" ").list.first().cast(pl.Int64).alias("expert"))
    layers = sorted(df["layer"].unique().to_list())
    assert layers == list(range(1, 48, 2))
    model = ModelInfo(name="Llama-4-Maverick", num_experts=128, top_k=1, moe_layers=layers, hidden_size=5120,
                      dtype="bfloat16")
    with TraceWriter(tmp_path / "t", model=model, source="jsonl") as w:
        for r, dom in df.select("request_id", "domain").unique().iter_rows():
            w.set_request(r, dom)
        w.write_routing(dict(request_id=df["request_id"].to_numpy(), step=df["step"].to_numpy(),
                             phase=(df["phase"] == "decode").to_numpy().astype(np.int8), pos=df["token_idx"].to_numpy(),
                             layer=df["layer"].to_numpy(), experts=df["expert"].to_numpy()[:, None]))
    d = timeline(tmp_path / "t", nodes=2, gpus_per_node=8, hw=Hardware(), policies=["linear", "eplb"], every=[40],
                 concurrency=16, moe_intermediate_size=8192)
    assert "no batch_id" in d["time_order"] and d["tokens"] == 40 * 128
    expert_bytes = 3 * 5120 * 8192 * 2
    for r in d["rows"]:
        assert r["migration_bytes"] == r["experts_moved"] * expert_bytes
        assert r["experts_moved"] <= r["rebalances"] * 24 * 128
    base = d["rows"][0]
    mat = np.asarray(d["traffic_matrices"][base["key"]])
    assert mat.sum() == pytest.approx(base["cross_node_bytes_per_token"] + base["intra_node_bytes_per_token"])
    # top-1 decode of 16 requests: reading the active experts' weights dominates the step
    assert base["comm_share"] < 0.05
    assert d["verdict"].startswith("On this trace and 2 × 8 GPUs")


def test_cli_rank_cost_is_checked_before_anything_is_written(cli, tmp_path):
    trace = _flip_trace(tmp_path / "trace")
    cost = tmp_path / "topology.json"
    cost.write_text(json.dumps({"rank_cost_matrix": [[0, 1, 1], [1, 0, 1], [1, 1, 0]]}))
    r = cli("simulate", trace, "--timeline", "-n", "1", "-g", "2", "--moe-intermediate-size", "512",
            "--rank-cost", cost, "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert r.stderr.strip() == (f"Error: {cost}: rank_cost_matrix has 3 ranks, the topology has 2 GPUs; give one "
                                "row and column per GPU (EP rank)")
    assert not (tmp_path / "o").exists()
    cost.write_text(json.dumps({"rank_cost_matrix": [[0, 5], [5, 0]]}))
    r = cli("simulate", trace, "--timeline", "-n", "1", "-g", "2", "--moe-intermediate-size", "512",
            "--rank-cost", cost, "--rebalance-every", "10", "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["rank_cost"] == str(cost) and d["best"] == "eplb · every 10"
