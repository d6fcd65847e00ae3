"""GPU time of a compiled decode step's kernels, per compilation: the model's own, a second one, the capture's.

``bench/gpu_ab_parts.py`` times decode steps on the host: a step's time there is the host's work
before the launch plus the GPU's work (the launching thread waits for the step's token). Two
compilations of the same model read about 2% apart that way (its ``plain-fresh`` A/A). This benchmark
asks the GPU instead: ``torch.profiler`` records every kernel of a ``generate()`` call (CUDA-graph
replays included) and the kernels' own durations are summed, per decode step. A difference between
arms here is in the kernels (their choice, their launch configurations, the capture's extra work on
the device); a host-side difference does not show.

Arms, alternating call by call in one process (compiled decoding, static cache, CUDA graphs):

- ``own``: transformers' own compiled call (the process's first compilation);
- ``fresh``: a second compilation of the model's call, made as the capture makes its own, no capture
  (``gpu_ab_parts.py``'s ``plain-fresh``);
- ``paused``: a capture open and paused (the model's own compiled call, no hook on the model);
- ``capture``: the same capture recording.

    python bench/gpu_kernel_time.py --model qwen3 --layers 12 --batch 1 --prompt 64 --new 32 --rounds 4
    python bench/gpu_kernel_time.py --rounds 2 --host-pairs 2000     # and the host's side, 2,000 pairs of calls
    python bench/gpu_kernel_time.py --rounds 2 --host-pairs 0 --ids-only   # a capture of expert ids only
    python bench/gpu_kernel_time.py --rounds 1 --host-pairs 2000 --start-first   # both orders of the bookkeeping

Prints, per arm and call, the decode kernels' summed GPU time per step (µs): Triton kernels (what
inductor generates and tunes) and every kernel, with their counts per step; then each arm's median
against ``own``'s. Kernels run before the first decode step's (the eager prefill) are left out.

Then the host's side (``--host-pairs``, 0 to skip): one real decode step's call, repeated, the two
arms' calls taking turns (the order swapped every pair), so that the host's drift from one second to
the next falls on both. Per call, the host's time until the step's CUDA graph is replayed (the work
before the launch, which delays the whole step; ``torch.cuda.CUDAGraph.replay`` is stamped), until
the call returns (and what the call does after the launch) and until the GPU is done (a synchronize
after each call, outside the other figures). ``own`` against ``fresh`` with no capture; then, with a
capture recording, the capture's compiled call against ``fresh`` (with ``--start-first``, also the
same call with its bookkeeping before the launch, as before 5f24ddf, all three taking turns). Each
difference comes with a 95% t-interval over rounds of calls; an earlier form in blocks of 100 calls a
side spread too much to place tens of µs. With the capture, its own work around the compiled call is timed too: the forward-start
bookkeeping (``_on_forward_start``; after the launch for a decode step since 5f24ddf) and the
forward end (``_on_forward_end``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gpu_step_profile as G  # noqa: E402
import moeprof  # noqa: E402
from gpu_ab_parts import _FreshCompile  # noqa: E402


class _Marked(G.Stamps):
    """Stamps that also mark, in the profiler's timeline, where the first decode step ends."""

    def __call__(self, input_ids, scores, **kwargs):
        if len(self.times) == 1:  # the prefill's stamp was the first: decode steps start here
            with torch.profiler.record_function("moeprof-bench: decode starts"):
                pass
        return super().__call__(input_ids, scores, **kwargs)


def kernel_time(model, inputs, new: int, stamps: _Marked) -> dict:
    """One profiled ``generate()``: the decode kernels' summed durations and counts per decode step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        G.generate(model, inputs, new, True, stamps)
    events = prof.events()
    marks = [e.time_range.start for e in events if e.name == "moeprof-bench: decode starts"]
    if not marks:
        raise SystemExit("no decode mark in the profile: the profiler recorded no CPU events")
    start = marks[0]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.time_range.start >= start]
    # Divided by the decode steps (new - 1): the mark falls between the first two decode steps on the host, and
    # the GPU may still be running the first one's kernels then, so between new - 2 and new - 1 steps' kernels
    # are counted: the absolute µs a step are within one step in new - 1 (3% at 32 new tokens); the arms,
    # measured alike, compare like for like.
    steps = new - 1
    triton = [e for e in kernels if e.name.startswith("triton_")]
    return dict(triton_us=sum(e.time_range.elapsed_us() for e in triton) / steps, triton_n=len(triton) / steps,
                all_us=sum(e.time_range.elapsed_us() for e in kernels) / steps, all_n=len(kernels) / steps)


def _cache_counts(kwargs: dict) -> tuple:
    """A static cache's layers with their token counts now, for :func:`host_pairs` to put back.

    The cache's layers count the tokens they hold (a device tensor each, which a compiled step may
    replace with one of its outputs), and a step writes at that count: the host timing puts the counts
    back before every call (outside the timing), or the repeated step would write past the cache's end.
    Read in the step's forward pre-hook (a host sync, in the untimed call that finds the step)."""
    from moeprof.capture.session import _find_cache

    _, cache = _find_cache(kwargs)
    layers = [layer for layer in getattr(cache, "layers", ())
              if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
    return layers, [int(layer.cumulative_length) for layer in layers]


def host_pairs(arms: dict, args_kw: tuple, pairs: int, next_position: dict[str, list[int]] | None = None,
               before_call=None) -> dict[str, np.ndarray]:
    """Per arm, per call: host µs until the step's CUDA graph is replayed (NaN where none is), until the
    call returns, and until the GPU is done, as ``(pairs, 3)`` columns (returns, GPU done, replay); the
    arms take turns in each round of calls, the order reversed every other round.

    ``next_position``: per arm, a one-item list holding the position its next call takes (every row of
    the batch alike), advanced by each of its calls; arms given the same list go on one sequence (a
    capture checks that each decode step continues its rows). An arm without one repeats the step's own
    positions. ``before_call(name)``, if given, is told which arm runs next (outside the timing)."""
    import time

    args, kwargs, (layers, counts) = args_kw
    positions = kwargs.get("position_ids")
    at = next_position or {}

    def rewind(name: str) -> None:
        for layer, n in zip(layers, counts):
            layer.cumulative_length.fill_(n)  # the layer's tensor now (not the one the step saw)
        if name in at and isinstance(positions, torch.Tensor):
            positions.fill_(at[name][0])
            at[name][0] += 1
        torch.cuda.synchronize()

    replays: list[int] = []
    graph = torch.cuda.CUDAGraph
    replay = graph.__dict__.get("replay")

    def stamped(self, *a, **k):  # the host's clock as the call replays its CUDA graph (the step's launch)
        replays.append(time.perf_counter_ns())
        return replay(self, *a, **k)

    def one(name: str) -> tuple[float, float, float]:
        rewind(name)
        if before_call is not None:
            before_call(name)
        replays.clear()
        t0 = time.perf_counter_ns()
        arms[name](*args, **kwargs)
        t1 = time.perf_counter_ns()
        torch.cuda.synchronize()
        t2 = time.perf_counter_ns()
        launch = (replays[0] - t0) / 1e3 if replays else float("nan")
        return (t1 - t0) / 1e3, (t2 - t0) / 1e3, launch

    names = list(arms)
    out: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
    if replay is not None:
        graph.replay = stamped
    try:
        with torch.no_grad():
            for name in names:  # warm: any CUDA graph recorded for these inputs now
                for _ in range(5):
                    one(name)
            for i in range(pairs):
                for name in names if i % 2 == 0 else names[::-1]:
                    out[name].append(one(name))
    finally:
        if replay is not None:
            graph.replay = replay
    return {name: np.array(v) for name, v in out.items()}


def _time_parts(rec, arm: list) -> dict[tuple[str, str], list[float]]:
    """Time the capture's own work around its compiled call, per call and arm (``arm[0]``, the arm running):
    the forward-start bookkeeping (``_on_forward_start``) and the forward end (``_on_forward_end``: the
    checks, the block copy's launches, the hand-off to the pipe). The capture's call looks both up on the
    recorder per call, so instance attributes wrap them; the wrapper's own cost (two clock reads) falls
    in the capture's arms."""
    import time

    out: dict[tuple[str, str], list[float]] = {}
    for attr, name in (("_on_forward_start", "forward start"), ("_on_forward_end", "forward end")):
        inner = getattr(rec, attr)

        def timed(*a, _inner=inner, _name=name, **k):
            t0 = time.perf_counter_ns()
            try:
                return _inner(*a, **k)
            finally:
                out.setdefault((arm[0], _name), []).append((time.perf_counter_ns() - t0) / 1e3)

        setattr(rec, attr, timed)
    return out


def _start_first(rec, call):
    """The capture's compiled call with its decode step's bookkeeping before the launch, as before 5f24ddf
    (``_decoding_on`` false for this call only)."""

    def run(*args, **kwargs):
        rec._decoding_on = lambda args, kwargs: False
        try:
            return call(*args, **kwargs)
        finally:
            del rec._decoding_on

    return run


def _report_host(label: str, out: dict, a: str, b: str) -> None:
    for k, what in ((2, "until the step's CUDA graph is replayed"), (0, "until the call returns"),
                    (1, "until the GPU is done")):
        x, y = out[a][:, k], out[b][:, k]
        if np.isnan(x).any() or np.isnan(y).any():
            continue  # no CUDA graph replayed (a CPU run)
        d = x - y
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
        print(f"  {label}, {what}: {a} {np.median(x):.1f} µs, {b} {np.median(y):.1f} µs (medians); "
              f"{a} - {b} {d.mean():+.1f} µs [{d.mean() - half:+.1f}, {d.mean() + half:+.1f}] over {len(d)} pairs, "
              f"median of the pairs' differences {np.median(d):+.1f} µs", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="qwen3", choices=("qwen3", "deepseek"))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32, help="new tokens per generate() (default 32)")
    ap.add_argument("--rounds", type=int, default=4, help="profiled calls per arm, alternating (default 4)")
    ap.add_argument("--host-pairs", type=int, default=1000, help="pairs of calls in each host timing (0: none)")
    ap.add_argument("--start-first", action="store_true",
                    help="a third host arm: the capture's call with its bookkeeping before the launch (as before 5f24ddf)")
    ap.add_argument("--ids-only", action="store_true",
                    help="the capture records expert ids only (weights=False): half the graph's extra outputs")
    args = ap.parse_args()

    model, inputs = G.model_and_inputs(args.model, args.layers, args.batch, args.prompt)
    stamps = _Marked()
    for _ in range(2):  # the model's own compiled call: traced, graphs recorded
        G.generate(model, inputs, args.new, True, stamps)
    # one real decode step's arguments (the third forward of a call), for the host timing
    seen: list = []
    grab = model.register_forward_pre_hook(lambda m, a, k: seen.append((a, dict(k), _cache_counts(k))), with_kwargs=True)
    G.generate(model, inputs, args.new, True, stamps)
    grab.remove()
    step = seen[2]
    host: dict = {}
    results: dict[str, list[dict]] = {}

    def measure(arm: str) -> None:
        r = kernel_time(model, inputs, args.new, stamps)
        results.setdefault(arm, []).append(r)
        print(f"  {arm}: Triton {r['triton_us']:.1f} µs in {r['triton_n']:.1f} kernels a step; "
              f"every kernel {r['all_us']:.1f} µs in {r['all_n']:.1f}", flush=True)

    def alternate(label: str, arms: tuple[str, str], switch) -> None:
        """Both arms warmed (traced, graphs recorded), then ``--rounds`` profiled calls each, alternating."""
        for arm in arms[::-1]:
            switch(arm)
            for _ in range(2):
                G.generate(model, inputs, args.new, True, stamps)
        for r in range(args.rounds):
            print(f"{label}round {r}", flush=True)
            for arm in arms if r % 2 == 0 else arms[::-1]:
                switch(arm)
                measure(arm)

    # no capture: the model's own compiled call against a second compilation
    fresh = _FreshCompile(model)
    alternate("", ("own", "fresh"), lambda arm: fresh.resume() if arm == "fresh" else fresh.pause())
    if args.host_pairs:
        config = model._last_compile_config
        host.update(host_pairs({"own": type(model).get_compiled_call(model, config), "fresh": fresh._get(config)},
                               step, args.host_pairs))
    fresh.close()
    # a capture, paused and recording
    with tempfile.TemporaryDirectory(prefix="moeprof-kernels-") as work:
        rec = moeprof.capture(model, Path(work) / "t", eos_token_id=None, weights=not args.ids_only).start()
        try:
            alternate("capture ", ("paused", "capture"), lambda arm: rec.resume() if arm == "capture" else rec.pause())
            if args.host_pairs:
                rec.resume()
                G.generate(model, inputs, args.new, True, stamps)  # a running batch: the calls below are its decode steps
                config = model._last_compile_config
                arm = [None]
                parts = _time_parts(rec, arm)
                call = model.get_compiled_call(config)
                arms = {"capture": call, "fresh": fresh._get(config)}
                # the capture's running batch ended at position prompt + new - 2: its calls go on from there
                sequence = [args.prompt + args.new - 1]
                positions = {"capture": sequence}
                if args.start_first:  # one sequence: both of the capture's arms continue the same batch
                    arms["start-first"] = _start_first(rec, call)
                    positions["start-first"] = sequence
                try:
                    more = host_pairs(arms, step, args.host_pairs, positions,
                                      before_call=lambda name: arm.__setitem__(0, name))
                    host.update({("beside the capture", name): v for name, v in more.items()})
                    host["parts"] = {key: np.array(v) for key, v in parts.items()}
                except Exception as exc:  # one step repeated is not a sequence the capture can place
                    print(f"(the capture's host timing stopped: {type(exc).__name__}: {str(exc)[:200]})", flush=True)
        finally:
            try:
                rec.close()
            except Exception as exc:  # the repeated step's rows may not pass the capture's checks at close
                print(f"(capture closed with {type(exc).__name__}: {str(exc)[:160]})")
    own = statistics.median(x["all_us"] for x in results["own"])
    own_t = statistics.median(x["triton_us"] for x in results["own"])
    print(f"\n{args.model} L{args.layers} batch {args.batch} prompt {args.prompt}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}: medians over {args.rounds} calls, against own")
    for arm, rs in results.items():
        a, t = statistics.median(x["all_us"] for x in rs), statistics.median(x["triton_us"] for x in rs)
        calls = " ".join(f"{x['all_us']:.1f}" for x in rs)
        print(f"  {arm}: every kernel {a:.1f} µs a step ({100 * (a / own - 1) if own else float('nan'):+.2f}%), "
              f"Triton {t:.1f} µs ({100 * (t / own_t - 1) if own_t else float('nan'):+.2f}%); calls {calls}")
    if host:
        print("\nhost, one decode step's call repeated, the arms taking turns:")
        _report_host("no capture", host, "own", "fresh")
        beside = {name: v for key, v in host.items() if isinstance(key, tuple) for name in key[1:]}
        if "capture" in beside:
            _report_host("a capture recording", beside, "capture", "fresh")
        if "start-first" in beside:
            _report_host("a capture recording", beside, "start-first", "fresh")
            _report_host("a capture recording", beside, "capture", "start-first")
        for (arm, name), v in host.get("parts", {}).items():
            v = v[-args.host_pairs:]  # the timed calls (each arm's first five warm it)
            print(f"  {arm}: the capture's {name}: median {np.median(v):.1f} µs, mean {v.mean():.1f} µs, "
                  f"p90 {np.quantile(v, 0.9):.1f} µs over {len(v)} calls")


if __name__ == "__main__":
    main()
