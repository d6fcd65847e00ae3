"""Where capture's end-to-end overhead lies, step by step: per-step wall times with and without capture.

``bench/capture_host_cost.py`` times capture's own entry points; ``bench/gpu_grid.py`` times whole
``generate()`` calls. Earlier notes found the end-to-end excess larger than the entry points' sum.
This benchmark stamps every decode step of both arms at the same place (a stopping criterion, which
``generate()`` calls once per step in either arm) and compares the distributions: a cost paid by
every step moves the median step; a cost paid now and then (a block processed, a garbage
collection, a CUDA graph recorded) moves the mean and the tail but not the median. Garbage
collections are counted and timed per call (``gc.callbacks``) in both arms.

Within one capture session the calls after the first ``--untimed`` are timed (a long capture's
steady state); plain calls alternate with capture sessions, so slow drift falls on both arms alike.

    python bench/gpu_step_profile.py --model deepseek --layers 3 --batch 1 --mode compiled
    python bench/gpu_step_profile.py --model qwen3 --layers 12 --batch 1 --mode eager --gc-freeze

Prints, per arm, the decode step's median, mean and percentiles (µs), the collections by generation,
the excess of capture at the median and at the mean with a bootstrap 95% interval, and writes the
per-step times as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an older tree can be timed
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moeprof  # noqa: E402


# two-sided 95% t quantiles by degrees of freedom
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20,
        12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11, 18: 2.10, 19: 2.09, 20: 2.09}


class Stamps:
    """A stopping criterion that never stops: it stamps the time of each step, in both arms alike."""

    def __init__(self) -> None:
        self.times: list[int] = []
        self._no: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter_ns())
        if self._no is None or self._no.shape[0] != input_ids.shape[0] or self._no.device != input_ids.device:
            self._no = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self._no


class Collections:
    """Garbage collections during a call: count and seconds per generation."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            g = info["generation"]
            self.count[g] += 1
            self.seconds[g] += time.perf_counter() - self._t0

    def reset(self) -> None:
        self.count, self.seconds = [0, 0, 0], [0.0, 0.0, 0.0]


def generate(model, inputs, new, compiled, stamps):
    from transformers import StoppingCriteriaList

    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              stopping_criteria=StoppingCriteriaList([stamps]))
    if compiled:
        from transformers.generation.configuration_utils import CompileConfig

        kw.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=False, mode="reduce-overhead"))
    torch.cuda.synchronize()
    stamps.times.clear()
    t0 = time.perf_counter_ns()
    model.generate(**inputs, **kw)
    torch.cuda.synchronize()
    t1 = time.perf_counter_ns()
    # step i's time: from the stamp of step i-1 (the prefill's stamp first) to its own; the first
    # decode step is skipped with the prefill (it may still pay the prefill's host work)
    t = np.array(stamps.times, dtype=np.int64)
    return (t1 - t0) / 1e9, np.diff(t)[1:] / 1e3


def model_and_inputs(name: str, layers: int, batch: int, prompt: int) -> tuple:
    """The benchmark model (``bench/gpu_capture.py``) and a seeded batch of random prompts for it."""
    from gpu_capture import build

    model = build(name, layers, "grouped_mm" if name == "deepseek" else None)
    g = torch.Generator(device="cpu").manual_seed(batch * 10007 + prompt)
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt), generator=g).cuda()
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def ab_sessions(ap: argparse.ArgumentParser, prefix: str, pairs: int, repeat: tuple[str, int, str],
                before_build=None) -> tuple:
    """Shared by the benches that alternate capture sessions of variants in one process (compiled decoding,
    each session timed by :func:`within_session`): adds their common options to ``ap`` (``repeat``: the name,
    default and help of the option that says how many sessions or rounds), parses them, calls
    ``before_build(args)`` if given (settings that must precede the model's own compilation), builds
    the model and prompts and warms both up. Returns ``(args, run, model, inputs, stamps, work)``, ``run``
    being the arguments :func:`within_session` takes."""
    ap.add_argument("--model", default="qwen3", choices=("qwen3", "deepseek"))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=pairs, help="recorded/paused pairs per session")
    ap.add_argument("--" + repeat[0], type=int, default=repeat[1], help=repeat[2])
    args = ap.parse_args()
    if before_build is not None:
        before_build(args)
    run = argparse.Namespace(model=args.model, layers=args.layers, mode="compiled", batch=args.batch,
                             prompt=args.prompt, new=args.new, within_session=args.pairs, out=None)
    model, inputs = model_and_inputs(args.model, args.layers, args.batch, args.prompt)
    stamps, work = Stamps(), Path(tempfile.mkdtemp(prefix=prefix))
    for _ in range(2):
        generate(model, inputs, args.new, True, stamps)
    return args, run, model, inputs, stamps, work


def t_interval(logs) -> tuple[float, float, float]:
    """The ratio exp(mean) - 1 of paired log ratios, with its 95% t-interval over pairs."""
    n = len(logs)
    m, sd = float(np.mean(logs)), float(np.std(logs, ddof=1))
    half = _T95.get(n - 1, 1.96 if n > 30 else 2.05) * sd / np.sqrt(n)
    return float(np.expm1(m)), float(np.expm1(m - half)), float(np.expm1(m + half))


def boot_ci(a: np.ndarray, b: np.ndarray, stat, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """stat(b) / stat(a) - 1 with a bootstrap 95% interval (steps resampled within each arm)."""
    rng = np.random.default_rng(seed)
    point = stat(b) / stat(a) - 1
    draws = [stat(b[rng.integers(0, len(b), len(b))]) / stat(a[rng.integers(0, len(a), len(a))]) - 1 for _ in range(n)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(point), float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek", choices=("qwen3", "deepseek"))
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128, help="new tokens per generate() (default 128)")
    ap.add_argument("--mode", default="compiled", choices=("eager", "compiled"))
    ap.add_argument("--rounds", type=int, default=6, help="capture sessions, each alternating with plain calls")
    ap.add_argument("--calls", type=int, default=4, help="timed calls per round and arm (default 4)")
    ap.add_argument("--untimed", type=int, default=None, help="untimed calls opening each capture session "
                    "(default 2 compiled: re-trace, then CUDA graphs re-recorded; 0 eager)")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after the warm-up (as vLLM does after start-up)")
    ap.add_argument("--arms", default="both", choices=("both", "plain", "capture"),
                    help="run one arm only (for a sampling profiler to compare two processes)")
    ap.add_argument("--within-session", type=int, default=0, metavar="PAIRS",
                    help="instead of rounds: one capture session, PAIRS calls recorded and PAIRS paused "
                         "(rec.pause(): the model's own compiled code), alternating call by call")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    print(f"moeprof from {Path(moeprof.__file__).parent}", flush=True)

    compiled = args.mode == "compiled"
    untimed = args.untimed if args.untimed is not None else (2 if compiled else 0)
    model, inputs = model_and_inputs(args.model, args.layers, args.batch, args.prompt)
    stamps, collections = Stamps(), Collections()
    work = Path(tempfile.mkdtemp(prefix="moeprof-steps-"))

    # warm-up: both arms compiled and their allocations grown
    for _ in range(2):
        generate(model, inputs, args.new, compiled, stamps)
    with moeprof.capture(model, work / "warm", force=True, eos_token_id=None):
        for _ in range(untimed + 1):
            generate(model, inputs, args.new, compiled, stamps)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    if args.within_session:
        return within_session(args, model, inputs, compiled, untimed, stamps, work)
    steps = {"plain": [], "capture": []}
    calls = {"plain": [], "capture": []}
    gcs = {"plain": [[0, 0, 0], [0.0, 0.0, 0.0]], "capture": [[0, 0, 0], [0.0, 0.0, 0.0]]}

    def timed(arm: str) -> None:
        collections.reset()
        seconds, per_step = generate(model, inputs, args.new, compiled, stamps)
        calls[arm].append(seconds)
        steps[arm].append(per_step)
        for gen in range(3):
            gcs[arm][0][gen] += collections.count[gen]
            gcs[arm][1][gen] += collections.seconds[gen]

    for r in range(args.rounds):
        for arm in ("plain", "capture") if r % 2 == 0 else ("capture", "plain"):
            if args.arms not in ("both", arm):
                continue
            if arm == "plain":
                for _ in range(args.calls):
                    timed("plain")
                continue
            rec = moeprof.capture(model, work / f"r{r % 2}", force=True, eos_token_id=None).start()
            try:
                for _ in range(untimed):
                    generate(model, inputs, args.new, compiled, stamps)
                for _ in range(args.calls):
                    timed("capture")
            finally:
                rec.close()

    if args.arms != "both":
        x = np.concatenate(steps[args.arms])
        print(f"{args.arms} only: {len(x)} decode steps, median {np.median(x):.1f} µs, mean {x.mean():.1f} µs")
        return
    a = np.concatenate(steps["plain"])
    b = np.concatenate(steps["capture"])
    print(f"{args.model} L{args.layers} {args.mode} batch {args.batch} prompt {args.prompt} new {args.new}"
          f"{' gc-frozen' if args.gc_freeze else ''}: {len(a)} plain and {len(b)} captured decode steps")
    for arm, x in (("plain", a), ("capture", b)):
        p = np.percentile(x, [10, 50, 90, 99])
        print(f"  {arm:8s} step µs: median {p[1]:8.1f}  mean {x.mean():8.1f}  p10 {p[0]:8.1f}  p90 {p[2]:8.1f}  "
              f"p99 {p[3]:8.1f}  max {x.max():9.1f} | call s median {statistics.median(calls[arm]):.4f} | "
              f"gc per call {[round(c / len(calls[arm]), 2) for c in gcs[arm][0]]} "
              f"ms per call {[round(1e3 * s / len(calls[arm]), 3) for s in gcs[arm][1]]}")
    med = boot_ci(a, b, np.median)
    mean = boot_ci(a, b, np.mean)
    print(f"  capture excess: median step {100 * med[0]:+.2f}% [{100 * med[1]:+.2f}, {100 * med[2]:+.2f}]  "
          f"mean step {100 * mean[0]:+.2f}% [{100 * mean[1]:+.2f}, {100 * mean[2]:+.2f}]  "
          f"({np.median(b) - np.median(a):+.1f} µs at the median, {b.mean() - a.mean():+.1f} µs mean)")
    # rounds as the unit: drift between rounds falls on both arms of a round alike
    per_round = [np.log(np.concatenate(steps["capture"][r * args.calls:(r + 1) * args.calls]).mean()
                        / np.concatenate(steps["plain"][r * args.calls:(r + 1) * args.calls]).mean())
                 for r in range(args.rounds)]
    m, sd = float(np.mean(per_round)), float(np.std(per_round, ddof=1)) if args.rounds > 1 else float("nan")
    half = _T95.get(args.rounds - 1, 2.0) * sd / np.sqrt(args.rounds)
    rounds_ci = (float(np.expm1(m)), float(np.expm1(m - half)), float(np.expm1(m + half)))
    print(f"  by rounds ({args.rounds}, t-interval of per-round mean-step log ratios): "
          f"{100 * rounds_ci[0]:+.2f}% [{100 * rounds_ci[1]:+.2f}, {100 * rounds_ci[2]:+.2f}]")
    # where the mean's excess lies: the steps above the plain arm's p99
    cut = np.percentile(a, 99)
    print(f"  steps above plain p99 ({cut:.0f} µs): plain {np.mean(a > cut) * 100:.2f}%, capture {np.mean(b > cut) * 100:.2f}%; "
          f"their excess time per step: plain {np.sum(np.maximum(a - cut, 0)) / len(a):.1f} µs, "
          f"capture {np.sum(np.maximum(b - cut, 0)) / len(b):.1f} µs")
    if args.out:
        args.out.write_text(json.dumps(dict(
            args={k: str(v) for k, v in vars(args).items()}, torch=torch.__version__,
            device=torch.cuda.get_device_name(), calls=calls, gc=gcs,
            steps={k: [s.round(1).tolist() for s in v] for k, v in steps.items()},
            median_excess=med, mean_excess=mean, rounds_excess=rounds_ci)))


def within_session(args, model, inputs, compiled, untimed, stamps, work, recorder=None) -> None:
    """One warm capture session; calls alternate recorded / paused (order swapped every pair). Per pair:
    the log ratio of the mean decode step, and of the whole call; a t-interval over pairs. ``recorder``:
    what stands in for the capture (``recorder(model)``, with ``resume``, ``pause``, ``close`` and ``rows``)."""
    try:
        from gpu_capture import GraphWork

        graphs = GraphWork()
    except Exception:  # no cudagraph trees (CPU)
        graphs = None
    rec = recorder(model) if recorder else moeprof.capture(model, work / "session", force=True, eos_token_id=None).start()
    step_logs, call_logs, flagged, recorded_calls = [], [], 0, 0
    means = {"capture": [], "paused": []}
    try:
        for arm in ("capture", "paused") * (untimed + 1):  # both arms warm: traced, graphs recorded
            rec.resume() if arm == "capture" else rec.pause()
            generate(model, inputs, args.new, compiled, stamps)
            recorded_calls += arm == "capture"
        # with a time budget (``args.budget`` seconds, as bench/gpu_session_grid.py sets it): pairs until it is
        # spent, at least ``args.min_pairs``, at most ``args.within_session``
        budget, t_start = getattr(args, "budget", None), time.monotonic()
        for i in range(args.within_session):
            if budget is not None and i >= args.min_pairs and time.monotonic() - t_start > budget:
                break
            pair = {}
            for arm in ("capture", "paused") if i % 2 == 0 else ("paused", "capture"):
                rec.resume() if arm == "capture" else rec.pause()
                before = graphs.mark() if graphs else 0
                seconds, per_step = generate(model, inputs, args.new, compiled, stamps)
                recorded_calls += arm == "capture"
                work_done = (graphs.mark() if graphs else 0) - before
                pair[arm] = (seconds, per_step.mean(), work_done)
                means[arm].append(per_step.mean())
            flagged += bool(pair["capture"][2] or pair["paused"][2])
            step_logs.append(np.log(pair["capture"][1] / pair["paused"][1]))
            call_logs.append(np.log(pair["capture"][0] / pair["paused"][0]))
    finally:
        close_error = None
        try:
            rec.close()
        except Exception as exc:  # printed after the timings, then raised
            close_error = exc

    st, ca = t_interval(step_logs), t_interval(call_logs)
    result = dict(pairs=len(step_logs), pairs_with_graph_work=flagged, step_excess=st, call_excess=ca,
                  recorded_us=float(np.median(means["capture"])), paused_us=float(np.median(means["paused"])),
                  rows=rec.rows, expected_rows=None)
    layout = getattr(rec, "layout", None)
    if layout is not None:  # a capture: every recorded call's tokens (prompt + new - 1 a row), every layer
        b, prompt = inputs["input_ids"].shape
        result["expected_rows"] = recorded_calls * len(layout.points) * b * (prompt + args.new - 1)
    print(f"{args.model} L{args.layers} {args.mode} batch {args.batch} prompt {args.prompt} new {args.new}: "
          f"{len(step_logs)} pairs in one capture session (recorded vs paused), {flagged} with graphs recorded")
    print(f"  mean decode step µs: recorded {np.median(means['capture']):.1f}, paused {np.median(means['paused']):.1f} (medians over calls)")
    print(f"  capture excess, mean decode step: {100 * st[0]:+.2f}% [{100 * st[1]:+.2f}, {100 * st[2]:+.2f}]; "
          f"whole call: {100 * ca[0]:+.2f}% [{100 * ca[1]:+.2f}, {100 * ca[2]:+.2f}]", flush=True)
    if result["expected_rows"] is not None:
        print(f"  rows: {rec.rows:,} recorded, {result['expected_rows']:,} expected from {recorded_calls} recorded calls", flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(
            args={k: str(v) for k, v in vars(args).items()}, torch=torch.__version__,
            device=torch.cuda.get_device_name(), pairs=len(step_logs), pairs_with_graph_work=flagged,
            step_excess=st, call_excess=ca, step_logs=step_logs, call_logs=call_logs)))
    if close_error is not None:
        close_error.bench_result = result  # the session's timings, for a caller that reads them past the error
        raise close_error
    return result


if __name__ == "__main__":
    main()
