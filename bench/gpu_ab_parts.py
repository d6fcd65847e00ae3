"""Which part of a compiled decode step's capture costs the step: sessions with parts left out, in one process.

Diagnostic (the variants record incomplete traces). Capture sessions alternate, each timed recorded
against paused calls within the session (``bench/gpu_step_profile.py --within-session``):

- ``full``: this tree;
- ``no-copy``: the step's routing is not copied into the block buffer after the graph's launch
  (``HostPipe._copy_into_block`` does nothing: no host tensor calls, no copy kernels);
- ``no-end``: nothing after the launch at all (``Recorder._on_forward_end`` only closes the step);
- ``ids-only``: a complete capture without the routing weights (``weights=False``): half the graph's
  extra outputs;
- ``closure-guards-kept``: a complete capture whose compiled code still checks, each step, what the
  capture's hooks close over (as before its guard filter, ``Recorder._own_hook_guards_dropped``);
- ``no-outputs``: the capture's own compiled code with hooks that record nothing (traced, they leave the
  graph as the model's own: no extra outputs) and nothing after the launch: what is left is the work before
  the launch (the wrapper, the forward-start bookkeeping, the guard check of the capture's code).
- ``hooks-kept-paused``: the capture's hooks stay on the model while paused (as before 012bf6c): the
  paused arm runs them eagerly around every forward;
- ``frames-default``: dynamo may compile the capture's top-level hook code as frames of its own (as
  before 29486e1, which marks that code to run as plain Python).
- ``start-first``: a complete capture whose compiled decode steps do their bookkeeping before the launch
  (``Recorder._decoding_on`` always false), as before it moved after the launch.
- ``bare-call``: ``no-outputs`` with the rest of the capture's call taken away too: no forward-start
  bookkeeping in a recorded call (a paused one keeps it: it takes the hooks off). Against ``no-outputs``:
  what that host work costs; against ``plain-fresh``: what is left. (Until the capture's call stopped
  toggling dynamo's ``skip_nnmodule_hook_guards`` per call, this variant also left that toggle out.)
- ``plain-fresh``: no capture at all. The "recorded" arm is a second compilation of the model's own
  call, made as the capture makes its own (a function of its own, a backend equal to no other), with
  no hook and nothing recorded; the "paused" arm is the model's own compiled call, as in every variant.
  The method's A/A: what one more compilation of the same model reads.
- ``fresh-hooked``: ``plain-fresh`` with the capture's hooks on the model, recording nothing (two
  top-level hooks and one per routing point) while its second compilation runs and is made: what
  tracing the hooks costs, with no capture object, wrapper or guard filter.
- ``fresh-fresh``: both arms second compilations made the same way in the session: the A/A with the
  process's first compilation (the model's own, every other variant's paused arm) out of it.

Each session also prints what dynamo compiled during it (frames, graphs, graph breaks).

What ``no-end`` still pays is the work before the launch (the forward-start bookkeeping, dynamo's
guard check of the capture's code) and the graph's own extra outputs (every layer's ids and weights).

    python bench/gpu_ab_parts.py --model qwen3 --layers 12 --batch 1 --pairs 30 --rounds 2
    python bench/gpu_ab_parts.py --variants full,plain-fresh --pairs 12 --rounds 30 --budget 400
    python bench/gpu_ab_parts.py --variants plain-fresh,fresh-fresh,full --pairs 6 --rounds 40 --budget 390 --pin-kernels
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import functools  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gpu_step_profile as G  # noqa: E402
import moeprof  # noqa: E402
from moeprof.capture import pipe, session  # noqa: E402


def _end_only(self, module, args, kwargs, output) -> None:
    if self._meta is not None:
        self._sink.active = False
        self._meta = self._inputs = None


def _hook_records_nothing(point, ordinal, sink):
    """A routing hook of the same kind as ``session._attach``'s that records nothing (traced or not)."""
    if point.kind == "experts_input":
        return point.module.register_forward_pre_hook(lambda module, args, kwargs: None, with_kwargs=True)
    return point.module.register_forward_hook(lambda module, args, output: None)


def _frames_default(fn) -> None:
    """Undo ``session._run_as_python`` on ``fn``'s code (the mark stays on the shared code object once set)."""
    from torch._dynamo.eval_frame import FrameAction, FrameExecStrategy, set_code_exec_strategy

    set_code_exec_strategy(fn.__code__, FrameExecStrategy(FrameAction.DEFAULT, FrameAction.DEFAULT))


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return dict(frames=counters["frames"]["total"], graphs=counters["stats"]["unique_graphs"],
                breaks=sum(counters["graph_break"].values()))


_real_start = session.Recorder._on_forward_start


def _start_when_paused(self, module, args, kwargs, launched=False) -> None:
    if self._want_paused:
        _real_start(self, module, args, kwargs, launched)


class _FreshCompile:
    """Stands in for a capture session in ``G.within_session`` (variant ``plain-fresh``): while "resumed",
    ``generate()`` gets a compilation of the model's call of its own, made once per session."""

    rows = 0

    def __init__(self, model) -> None:
        self.model, self.fresh = model, None

    def _get(self, compile_config):
        if self.fresh is None:
            model = self.model
            type(model).get_compiled_call(model, compile_config)  # the model's own settings, as the capture reads them
            config = model._last_compile_config
            self.fresh = torch.compile(session._own_code(model.__call__), backend=session._distinct_backend(config),
                                       fullgraph=config.fullgraph, dynamic=config.dynamic)
        return self.fresh

    def resume(self) -> None:
        self.model.get_compiled_call = self._get

    def pause(self) -> None:
        self.model.__dict__.pop("get_compiled_call", None)

    close = pause


class _FreshHooked(_FreshCompile):
    """Variant ``fresh-hooked``: ``plain-fresh`` with hooks on the model while "resumed" (two top-level
    hooks and one per routing point, as the capture registers them, none recording anything), so its
    second compilation traces them, as the capture's does; no capture object, wrapper or guard filter."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.points, self.handles = session.discover(model).points, []

    def resume(self) -> None:
        if not self.handles:
            self.handles = [self.model.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True),
                            self.model.register_forward_hook(lambda m, a, k, o: None, with_kwargs=True)]
            self.handles += [_hook_records_nothing(point, n, None) for n, point in enumerate(self.points)]
        super().resume()

    def pause(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        super().pause()

    close = pause


class _FreshFresh(_FreshCompile):
    """Variant ``fresh-fresh``: both arms second compilations made the same way in the session (the
    "paused" arm one of its own too, not the model's): how far apart two like compilations read, with
    no first compilation of the process in the comparison."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.other = _FreshCompile(model)

    def pause(self) -> None:
        self.model.get_compiled_call = self.other._get

    def close(self) -> None:
        self.model.__dict__.pop("get_compiled_call", None)


RECORDERS = {"plain-fresh": _FreshCompile, "fresh-hooked": _FreshHooked, "fresh-fresh": _FreshFresh}

# variants whose trace is complete: each session's rows are checked against the recorded calls' tokens
COMPLETE = {"full", "ids-only", "closure-guards-kept", "hooks-kept-paused", "frames-default", "start-first"}

VARIANTS = {
    "full": {},
    "no-copy": {(pipe.HostPipe, "_copy_into_block"): lambda self, meta, ids, weights, small: None},
    "no-end": {(session.Recorder, "_on_forward_end"): _end_only},
    "ids-only": {(moeprof, "capture"): functools.partial(moeprof.capture, weights=False)},
    "closure-guards-kept": {(session.Recorder, "_own_hook_guards_dropped"): lambda self, entries: [True] * len(entries)},
    "no-outputs": {(session, "_attach"): _hook_records_nothing, (session.Recorder, "_on_forward_end"): _end_only},
    "hooks-kept-paused": {(session.Recorder, "_take_hooks_off"): lambda self: None},
    "frames-default": {(session, "_run_as_python"): _frames_default},
    "start-first": {(session.Recorder, "_decoding_on"): lambda self, args, kwargs: False},
    "bare-call": {(session, "_attach"): _hook_records_nothing, (session.Recorder, "_on_forward_end"): _end_only,
                  (session.Recorder, "_on_forward_start"): _start_when_paused},
    "plain-fresh": {},
    "fresh-hooked": {},
    "fresh-fresh": {},
}


def welch(a, b) -> tuple[float, float, float]:
    """mean(a) - mean(b) with a 95% Welch interval (t at the Welch-Satterthwaite degrees of freedom,
    rounded down: no scipy on the GPU machine)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
    t = G._T95.get(max(1, int(df)), 1.96 if df > 30 else 2.05)
    d, half = float(a.mean() - b.mean()), t * float(np.sqrt(va + vb))
    return d, d - half, d + half


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"which, comma-separated (default {','.join(VARIANTS)})")
    ap.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                    help="start no round after this many seconds (the summary is still printed)")
    ap.add_argument("--pin-kernels", action="store_true",
                    help="less on-device benchmarking of kernel choices in every compilation of the process: "
                         "pointwise autotuning off, inductor's deterministic mode asked for (torch 2.11 and 2.13 printed "
                         "it off all the same); set before the model's own compilation")

    def pin_kernels(args) -> None:
        if args.pin_kernels:
            import torch._inductor.config as inductor

            inductor.deterministic, inductor.triton.autotune_pointwise = True, False

    args, run, model, inputs, stamps, work = G.ab_sessions(
        ap, "moeprof-parts-", 30, ("rounds", 2, "rounds of one session per variant"), pin_kernels)
    import torch._inductor.config as inductor

    # what decides how alike two compilations are: on-device benchmarking of kernel choices
    # (TORCHINDUCTOR_DETERMINISTIC=1 skips it), pointwise autotuning, the FX graph cache
    print("inductor: " + ", ".join(f"{k}={getattr(inductor, k, 'absent')}" for k in ("deterministic", "fx_graph_cache"))
          + f", triton.autotune_pointwise={inductor.triton.autotune_pointwise}", flush=True)
    per_session: dict[str, list[float]] = {}
    step_us: dict[str, list[tuple[float, float]]] = {}
    wrong: list[str] = []  # sessions of a complete variant whose rows are not every recorded token's
    t_start = time.monotonic()
    for r in range(args.rounds):
        if args.budget is not None and r and time.monotonic() - t_start > args.budget:
            print(f"(budget of {args.budget:.0f} s spent after {r} rounds)", flush=True)
            break
        names = args.variants.split(",")
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            saved = {(owner, attr): getattr(owner, attr) for owner, attr in VARIANTS[name]}
            for (owner, attr), fn in VARIANTS[name].items():
                setattr(owner, attr, fn)
            print(f"### round {r}: {name}", flush=True)
            before = _dynamo_counts()
            try:
                result = G.within_session(run, model, inputs, True, 2, stamps, work, RECORDERS.get(name))
            except Exception as exc:  # a variant's incomplete trace may fail at close, after its timings
                print(f"  ({type(exc).__name__} at close: {str(exc)[:200]})", flush=True)
                result = getattr(exc, "bench_result", None)
            finally:
                for (owner, attr), fn in saved.items():
                    setattr(owner, attr, fn)
                if name == "frames-default":  # the shared hook code back to run as plain Python
                    session._top_level(None, lambda *a: None)
            if result is not None and name in COMPLETE and result.get("expected_rows") not in (None, result["rows"]):
                print(f"  WRONG ROWS: {name} recorded {result['rows']:,}, expected {result['expected_rows']:,}", flush=True)
                wrong.append(name)
            if result is not None:
                per_session.setdefault(name, []).append(float(np.log1p(result["step_excess"][0])))
                step_us.setdefault(name, []).append((result["recorded_us"], result["paused_us"]))
            after = _dynamo_counts()
            print("  dynamo during the session: " + ", ".join(f"{k} +{after[k] - before[k]}" for k in after), flush=True)

    # Each session compiles the capture's code anew (its kernels, their launch configurations): the
    # spread between sessions is part of what a capture costs, and wider than one session's interval.
    print("\nover sessions (each one compile of the capture's code), mean decode step excess [95% over sessions]:")
    for name, logs in per_session.items():
        if len(logs) > 1:
            m, lo, hi = G.t_interval(logs)
            print(f"  {name}: {len(logs)} sessions, {100 * m:+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]; "
                  f"sessions from {100 * np.expm1(min(logs)):+.2f}% to {100 * np.expm1(max(logs)):+.2f}%", flush=True)
    # Against the method's A/A: the paused arm is one compilation and every variant's arm another, so a
    # variant's distance from plain-fresh (a second compilation with no capture) is what the capture adds.
    if len(per_session.get("plain-fresh", ())) > 1:
        print("\nagainst plain-fresh (a second compilation, no capture), difference of mean log excess "
              "[95% Welch interval over sessions]:")
        for name, logs in per_session.items():
            if name != "plain-fresh" and len(logs) > 1:
                d, lo, hi = welch(logs, per_session["plain-fresh"])
                print(f"  {name}: {100 * d:+.2f} points [{100 * lo:+.2f}, {100 * hi:+.2f}]", flush=True)
    # which arm moves between sessions: the recorded one is compiled anew each session, the paused one
    # (the model's own compiled call) once per process
    print("\nmean decode step µs per session (medians over a session's calls), recorded / paused:")
    for name, pairs in step_us.items():
        rec, paused = np.array(pairs).T
        print(f"  {name}: recorded {' '.join(f'{x:.1f}' for x in rec)} (sd {np.std(rec, ddof=1) if len(rec) > 1 else 0:.1f}); "
              f"paused {' '.join(f'{x:.1f}' for x in paused)} (sd {np.std(paused, ddof=1) if len(paused) > 1 else 0:.1f})",
              flush=True)
    if wrong:
        raise SystemExit(f"wrong rows in {len(wrong)} session(s): {', '.join(wrong)}")


if __name__ == "__main__":
    main()
