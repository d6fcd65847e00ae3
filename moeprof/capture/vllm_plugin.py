"""moeprof inside vLLM: ``MOEPROF_TRACE=DIR vllm serve MODEL`` records every token's experts into DIR.

vLLM loads the entry points of the group ``vllm.general_plugins`` in every process it starts (the
API server, the engine core, each worker; ``VLLM_PLUGINS`` filters them by name). moeprof's entry
point, :func:`register`, does nothing unless ``MOEPROF_TRACE`` is set. When it is, it patches vLLM's
V1 model runner (``vllm/v1/worker/gpu_model_runner.py``: ``GPUModelRunner`` and the CPU/XPU runners
built on it) in that process:

1. ``load_model``: after the model is built (so before CUDA graphs are captured), every MoE layer's
   router (``BaseRouter``, ``vllm/model_executor/layers/fused_moe/router/base_router.py``) gets a
   capture callback through ``capture_fn``. It receives the logical top-k ids ``[tokens, k]`` before
   EPLB's physical remapping and hands them to vLLM's own ``RoutedExpertsCapturer``
   (``fused_moe/routed_experts_capturer.py``), which picks this data-parallel rank's rows out of
   every DP dispatch layout and writes them into its preallocated device buffer
   ``[max_num_batched_tokens, num_layers, k]``. That is the whole per-layer cost: one device copy,
   no host synchronisation, nothing allocated, so it is safe inside captured CUDA graphs. A
   callback already set (vLLM's own routed-experts return) is chained, also one set later.
2. ``_prepare_inputs``: the per-step batch on the host: ``input_batch.req_ids``, the scheduled
   tokens of each request, ``num_computed_tokens_cpu`` (where each request's tokens start) and
   ``num_prompt_tokens`` (prefill vs decode, chunked prefill included).
3. ``execute_model``: after the forward pass, one slice of the buffer (the MoE layers, the step's
   tokens) and the step's input token ids leave the device in one asynchronous copy per step
   (synchronous on CPU, where it is a memcpy), and the pass is queued for the recorder thread
   (:class:`~moeprof.capture.live.LiveRecorder`), which writes and flushes the trace.
4. ``shutdown`` (and process exit): the rank's trace is closed ``complete: true``.

Ranks: tensor-parallel ranks compute the same routing, so only TP rank 0 of each data-parallel rank
and pipeline stage records; each writes ``DIR/ranks/dp<d>-pp<p>/`` and the merged ``DIR/manifest.json``
lists them all (:mod:`moeprof.capture.shards`). Every TP rank still runs the callback, because
vLLM's capturer gathers sequence-parallel shards across the TP group.

Not supported (refused at start with a message): speculative decoding (draft tokens would be
recorded as routing of tokens that were never accepted), kernels that route inside a monolithic
MoE kernel (no router callback), and vLLM's V2 model runner (``VLLM_USE_V2_MODEL_RUNNER``).

Environment: ``MOEPROF_TRACE`` (output directory: new or empty), ``MOEPROF_TRACE_FORCE=1`` (replace a
moeprof trace already there), ``MOEPROF_FLUSH_SECONDS`` (default 5: the most a crash can lose).
"""

from __future__ import annotations

import atexit
import functools
import importlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.errors import CaptureError, OutputExistsError

ENV_TRACE = "MOEPROF_TRACE"
ENV_FORCE = "MOEPROF_TRACE_FORCE"
ENV_FLUSH = "MOEPROF_FLUSH_SECONDS"
# Set by the first process that checked DIR; the engine and worker processes it starts inherit it,
# so only that process may ever replace an earlier trace.
_ENV_CHECKED = "MOEPROF_TRACE_CHECKED"

logger = logging.getLogger("vllm.moeprof")

_RUNNERS = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
    ("vllm.v1.worker.xpu_model_runner", "XPUModelRunner"),
)


def register() -> None:
    """Entry point of ``vllm.general_plugins``: arm recording when ``MOEPROF_TRACE`` is set."""
    out = os.environ.get(ENV_TRACE, "").strip()
    if not out:
        return
    if os.environ.get(_ENV_CHECKED) != out:
        _prepare(Path(out))
        os.environ[_ENV_CHECKED] = out
    _patch_runners()


def _prepare(out: Path) -> None:
    from moeprof.trace.writer import prepare_output_dir

    force = os.environ.get(ENV_FORCE, "").strip().lower() in ("1", "true", "yes")
    try:
        prepare_output_dir(out, force)
    except OutputExistsError as exc:
        msg = str(exc).replace("pass --force", f"set {ENV_FORCE}=1").replace("--force", f"{ENV_FORCE}=1")
        raise OutputExistsError(f"{ENV_TRACE}={out}: {msg}") from None


def _flush_seconds() -> float:
    raw = os.environ.get(ENV_FLUSH, "5")
    try:
        value = float(raw)
    except ValueError:
        raise CaptureError(f"{ENV_FLUSH}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise CaptureError(f"{ENV_FLUSH}={raw!r}: must be positive")
    return value


# -- patching ------------------------------------------------------------------------------------
def _patch_runners() -> None:
    classes = []
    for module, name in _RUNNERS:
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except Exception:  # noqa: BLE001 - a platform's runner may not import elsewhere
            continue
    if not classes:
        raise CaptureError("vLLM's V1 model runner (vllm.v1.worker.gpu_model_runner) is not importable")
    base = classes[0]
    for cls in classes:
        if "load_model" in cls.__dict__:
            _wrap(cls, "load_model", _after_load)
    _wrap(base, "_prepare_inputs", _after_prepare)
    _wrap_execute(base)
    _wrap(base, "shutdown", _before_shutdown, before=True)


def _wrap(cls: type, name: str, hook, before: bool = False) -> None:
    original = cls.__dict__[name]
    if getattr(original, "__moeprof__", False):
        return

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        if before:
            hook(self, args, kwargs)
            return original(self, *args, **kwargs)
        result = original(self, *args, **kwargs)
        hook(self, args, kwargs)
        return result

    wrapper.__moeprof__ = True
    setattr(cls, name, wrapper)


def _wrap_execute(cls: type) -> None:
    original = cls.__dict__["execute_model"]
    if getattr(original, "__moeprof__", False):
        return

    @functools.wraps(original)
    def execute_model(self, *args, **kwargs):
        rec: _RunnerRecorder | None = getattr(self, "_moeprof", None)
        if rec is None or rec.live is None:
            return original(self, *args, **kwargs)
        rec.pending = None
        result = original(self, *args, **kwargs)
        if rec.pending is not None:
            rec.after_forward(self)
        return result

    execute_model.__moeprof__ = True
    cls.execute_model = execute_model


def _after_load(runner, args, kwargs) -> None:
    if getattr(runner, "_moeprof", None) is None:
        runner._moeprof = _RunnerRecorder(runner)


def _after_prepare(runner, args, kwargs) -> None:
    rec: _RunnerRecorder | None = getattr(runner, "_moeprof", None)
    if rec is not None and rec.live is not None:
        scheduler_output = args[0] if args else kwargs["scheduler_output"]
        rec.snapshot_batch(runner, scheduler_output)


def _before_shutdown(runner, args, kwargs) -> None:
    rec: _RunnerRecorder | None = getattr(runner, "_moeprof", None)
    if rec is not None:
        rec.close()


# -- the per-runner recorder --------------------------------------------------------------------
class _Capture:
    """A router's ``capture_fn``: route the ids into vLLM's capturer, then any callback set before or after."""

    def __init__(self, capturer: Any, layer_id: int, inner: Any) -> None:
        self.capturer = capturer
        self.layer_id = layer_id
        self.inner = inner

    def __call__(self, topk_ids) -> None:
        self.capturer.capture(self.layer_id, topk_ids)
        if self.inner is not None:
            self.inner(topk_ids)


def _chain_later_setters() -> None:
    """Keep our callback when vLLM (or anyone) calls ``set_capture_fn`` after us: chain theirs."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    original = BaseRouter.set_capture_fn
    if getattr(original, "__moeprof__", False):
        return

    def set_capture_fn(self, capture_fn) -> None:
        ours = getattr(self, "_moeprof_capture", None)
        if ours is None or capture_fn is ours:
            return original(self, capture_fn)
        ours.inner = capture_fn

    set_capture_fn.__moeprof__ = True
    BaseRouter.set_capture_fn = set_capture_fn


class _RunnerRecorder:
    """Binds the routers of one model runner and turns its steps into :class:`PassRecord`s."""

    def __init__(self, runner) -> None:
        import torch

        from vllm.distributed.parallel_state import get_pp_group, get_tp_group
        from vllm.model_executor.layers.fused_moe.routed_experts_capturer import RoutedExpertsCapturer

        cfg = runner.vllm_config
        self.pending: tuple | None = None
        self.live = None
        if cfg.speculative_config is not None:
            raise CaptureError(
                f"{ENV_TRACE} is set but vLLM runs speculative decoding, which the moeprof plugin does not "
                "record (draft tokens are routed before they are accepted); unset one of them"
            )
        if getattr(cfg, "use_v2_model_runner", False):
            raise CaptureError(f"{ENV_TRACE} is set but vLLM runs its V2 model runner; the plugin records the V1 runner")
        self.capturer = RoutedExpertsCapturer(
            max_num_batched_tokens=cfg.scheduler_config.max_num_batched_tokens, vllm_config=cfg
        )
        layers = _bind(runner.get_model(), self.capturer)
        self.layers = sorted(layers)
        self.layer_index = torch.tensor(self.layers, dtype=torch.long, device=self.capturer.device_buffer.device)
        # Every layer an MoE layer (the common case): the buffer slice is already in layer order.
        self.all_layers = self.layers == list(range(self.capturer.device_buffer.shape[1]))
        tp, pp = get_tp_group(), get_pp_group()
        if tp.rank_in_group != 0:
            return  # every TP rank holds the same routing; TP rank 0 records it
        dp = int(cfg.parallel_config.data_parallel_rank)
        rank = {"dp": dp, "pp": pp.rank_in_group, "tp": 0, "host": socket.gethostname(), "pid": os.getpid()}
        from moeprof.capture.live import LiveRecorder

        out = Path(os.environ[ENV_TRACE])
        self.live = LiveRecorder(
            root=out,
            rank=f"dp{dp}-pp{pp.rank_in_group}",
            model=_model_info(cfg, self.layers),
            layers=self.layers,
            source="vllm",
            capture={**_settings(cfg), "rank": rank},
            missing={"weights": "vLLM's router capture callback (BaseRouter.capture_fn) receives expert ids only"},
            notes=_notes(cfg),
            rank_offset=dp,
            flush_seconds=_flush_seconds(),
        )
        atexit.register(self.close)
        logger.info(
            "moeprof: recording the routing of %d MoE layers into %s", len(self.layers), self.live.writer.out
        )

    def snapshot_batch(self, runner, scheduler_output) -> None:
        """Host-side layout of the step about to run (called right after ``_prepare_inputs``)."""
        batch = runner.input_batch
        r = batch.num_reqs
        req_ids = list(batch.req_ids[:r])
        scheduled = scheduler_output.num_scheduled_tokens
        self.pending = (
            req_ids,
            np.array([scheduled[i] for i in req_ids], dtype=np.int64),
            batch.num_computed_tokens_cpu[:r].astype(np.int64),
            batch.num_prompt_tokens[:r].astype(np.int64),
        )

    def after_forward(self, runner) -> None:
        import torch

        from moeprof.capture.live import PassRecord

        req_ids, num_tokens, start, prompt = self.pending
        self.pending = None
        n = int(num_tokens.sum())
        # One gather of the MoE layers, narrowed to int16 on the device, then one copy to the host.
        ids = self.capturer.device_buffer[:n]
        if not self.all_layers:
            ids = ids.index_select(1, self.layer_index)
        ids = ids.to(torch.int16)  # always a new tensor: the buffer is overwritten by the next step
        tokens = runner.input_ids.gpu[:n]
        ready = None
        if ids.device.type == "cpu":
            tokens = tokens.clone()
        else:
            host_ids = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host_ids.copy_(ids, non_blocking=True)
            host_tokens.copy_(tokens, non_blocking=True)
            event = torch.Event(device=ids.device)
            event.record()
            ids, tokens, ready = host_ids, host_tokens, event.synchronize
        self.live.push(PassRecord(req_ids, num_tokens, start, prompt, ids.numpy(), tokens.numpy(), ready))

    def close(self) -> None:
        if self.live is not None:
            self.live.close()


def _bind(model, capturer) -> list[int]:
    """Attach a :class:`_Capture` to every MoE router of ``model``; return their layer indices."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    _chain_later_setters()
    layers = []
    for module in model.modules():
        if not isinstance(module, MoERunner):
            continue
        if module.is_monolithic:
            raise CaptureError(
                f"{ENV_TRACE} is set but MoE layer {module.layer_name} routes inside a monolithic kernel "
                f"({type(module.routed_experts.quant_method).__name__}), which has no router callback to record"
            )
        router = module.router
        if not isinstance(router, BaseRouter):
            raise CaptureError(f"{ENV_TRACE}: router {type(router).__name__} of {module.layer_name} has no capture_fn")
        hook = _Capture(capturer, module.layer_id, router.capture_fn)
        router._moeprof_capture = hook
        router.capture_fn = hook
        layers.append(module.layer_id)
    if not layers:
        raise CaptureError(f"{ENV_TRACE} is set but the model has no MoE layer with a vLLM router to record")
    return layers


def _model_info(cfg, layers: list[int]):
    from moeprof.trace.manifest import ModelInfo

    mc = cfg.model_config
    text = mc.hf_text_config
    name = mc.served_model_name
    if isinstance(name, (list, tuple)):
        name = name[0]
    return ModelInfo(
        name=str(name or mc.model),
        num_experts=int(mc.get_num_experts()),
        top_k=int(mc.get_num_experts_per_tok()),
        moe_layers=list(layers),
        architecture=(getattr(mc, "architectures", None) or [None])[0],
        num_layers=int(mc.get_total_num_hidden_layers()),
        num_shared_experts=int(getattr(text, "n_shared_experts", 0) or 0),
        hidden_size=int(mc.get_hidden_size()),
        dtype=str(mc.dtype).replace("torch.", ""),
    )


def _settings(cfg) -> dict[str, Any]:
    import vllm

    par, sched, cache = cfg.parallel_config, cfg.scheduler_config, cfg.cache_config
    return {
        "engine": "vllm",
        "vllm_version": vllm.__version__,
        "plugin": "moeprof.capture.vllm_plugin",
        "model": cfg.model_config.model,
        "device": str(cfg.device_config.device_type),
        "tensor_parallel_size": par.tensor_parallel_size,
        "pipeline_parallel_size": par.pipeline_parallel_size,
        "data_parallel_size": par.data_parallel_size,
        "enable_expert_parallel": bool(par.enable_expert_parallel),
        "enable_eplb": bool(getattr(par, "enable_eplb", False)),
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "max_num_seqs": sched.max_num_seqs,
        "enable_chunked_prefill": bool(sched.enable_chunked_prefill),
        "async_scheduling": bool(sched.async_scheduling),
        "enable_prefix_caching": bool(cache.enable_prefix_caching),
        "enforce_eager": bool(cfg.model_config.enforce_eager),
        "max_model_len": cfg.model_config.max_model_len,
        "flush_seconds": _flush_seconds(),
    }


def _notes(cfg) -> list[str]:
    notes = []
    if cfg.cache_config.enable_prefix_caching:
        notes.append(
            "prefix caching is on: prompt tokens served from vLLM's prefix cache never run through the "
            "model and have no rows (requests.prompt_tokens counts the whole prompt)"
        )
    return notes
