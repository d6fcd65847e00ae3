"""The capture's own compiled call with and without dynamo's guards on module hooks, in one process.

Until 94965bf a capture compiled its own call with ``skip_nnmodule_hook_guards`` off, so every step
checked every module's hook dicts before the CUDA graph was launched. This benchmark alternates
capture sessions of this tree and of this tree with those guards kept (the config flag held off, as
before), each timed recorded against paused calls within the session
(``bench/gpu_step_profile.py --within-session``), so the two variants share one model, one process and
its warm compiled code.

    python bench/gpu_ab_hook_guards.py --model qwen3 --layers 12 --batch 1 --pairs 40 --sessions 4

Prints, per session, the capture's excess on the mean decode step and on the whole call with 95%
intervals over pairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_step_profile as G  # noqa: E402


class _HookGuardsKept:
    """``torch._dynamo.config`` that ignores turning ``skip_nnmodule_hook_guards`` on: the capture's
    compiled call is then compiled with guards on every module's hook dicts, as before 94965bf."""

    def __init__(self, real) -> None:
        object.__setattr__(self, "_real", real)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __setattr__(self, name, value):
        if name != "skip_nnmodule_hook_guards" or value is not True:
            setattr(self._real, name, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args, run, model, inputs, stamps, work = G.ab_sessions(
        ap, "moeprof-guards-", 40, ("sessions", 4, "capture sessions, alternating the two variants"))
    real = torch._dynamo.config
    for k in range(args.sessions):
        variant = "hook guards kept (as before)" if k % 2 else "this tree"
        if k % 2:
            sys.modules["torch._dynamo.config"] = torch._dynamo.config = _HookGuardsKept(real)
        print(f"### session {k}: {variant}", flush=True)
        try:
            G.within_session(run, model, inputs, True, 2, stamps, work)
        finally:
            sys.modules["torch._dynamo.config"] = torch._dynamo.config = real


if __name__ == "__main__":
    main()
