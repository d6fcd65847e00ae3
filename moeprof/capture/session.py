"""Record a model's routing while it runs: ``with capture(model, out) as rec: model.generate(...)``.

How a forward step is recorded:

1. A forward pre-hook on the top-level model notes the step's shape (batch ``b`` x new tokens ``s``),
   whether it starts new sequences (empty KV cache: a prefill), and keeps the input ids and the
   validity of each new token (``attention_mask[:, -s:]``) as device tensors.
2. At every MoE layer, the routing point's hook (:mod:`moeprof.capture.hooks`) drops the ids
   ``(b*s, k)`` and weights into that layer's slot of :class:`StepSink`. This per-layer path has no
   host synchronisation and no branch on tensor values, so it can run inside CUDA graphs once the
   slots become a preallocated device ring buffer (the GPU work of issue 7).
3. A forward hook on the top-level model hands the slots, with the step's token ids, positions and
   validity, to :class:`~moeprof.capture.pipe.HostPipe`, which gathers them into one device buffer
   (one stack per dtype) and makes ONE device-to-host copy (asynchronous, into pooled pinned
   memory on CUDA). In eager decoding it keeps only references to a decode step's outputs and
   gathers 32 steps at once (see :mod:`moeprof.capture.pipe` for when that is safe).
4. The host side takes finished steps 32 at a time: it drops padding and tokens after EOS, assigns
   requests, positions, steps and phases, vectorised over a block of decode steps, and hands
   column chunks to :class:`~moeprof.trace.writer.TraceWriter`, whose background thread writes the
   Parquet shards. Large blocks (big prefills) are processed by a worker thread.

What is counted: for each request and each MoE layer, one row per prompt token (padding excluded;
step 0, phase ``prefill``) and one row per generated token fed back to the model (step ``i`` is the
i-th decode forward; phase ``decode``). ``generate()`` never feeds back the last token it generates,
so a request that generated N tokens has N - 1 decode rows, or N when it emitted EOS while other
rows of its batch kept going (its EOS is fed back once). Tokens fed after a row's EOS are padding
and are not recorded.

Memory is bounded: at most ``buffer_rows`` rows (plus one step) are staged on the host before they
go to the writer, whose queue and shard size are bounded too (see :mod:`moeprof.trace.writer`).
"""

from __future__ import annotations

import builtins
import hashlib
import platform
import re
import threading
import time
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from moeprof.capture.continuous import BatchPlan, PlanTap, is_packed_forward
from moeprof.capture.hooks import MoeLayout, RoutingPoint, discover
from moeprof.capture.pipe import HostPipe, Step
from moeprof.errors import CaptureError
from moeprof.trace.manifest import Manifest
from moeprof.trace.schema import PHASES
from moeprof.trace.writer import TraceWriter

DEFAULT_DOMAIN = "unlabelled"

COUNTING_RULE = (
    "rows per request per MoE layer = prompt tokens (padding excluded, step 0) + generated tokens fed "
    "back to the model (one decode step each); generate() never feeds back its last generated token; "
    "tokens fed after a request's EOS are padding and not recorded"
)


COMPILED_WEIGHTS_NOTE = (
    "decode steps ran compiled (torch.compile, static cache) with routing weights recorded: the hooks are "
    "part of the compiled graph, and a graph that hands the weights back may round the router differently "
    "from the same model compiled without capture (on an H200, logits moved by up to 0.08 at batch 1, no "
    "greedy token changed; bench/gpu_capture_unchanged.py). Expert ids alone (weights=False) left the "
    "logits bit for bit unchanged where compiling is repeatable"
)


@dataclass
class _Label:
    request_id: int
    domain: str
    dataset: str | None
    text_sha256: str | None


@dataclass
class _Request:
    label: _Label
    prompt_tokens: int = 0
    decode_tokens: int = 0
    next_pos: int = 0  # continuous batching: first position not recorded yet (recomputed tokens are skipped)


@dataclass
class _StepMeta:
    batch_id: int
    b: int
    s: int
    new_sequences: bool
    labels: list[_Label] = field(default_factory=list)
    cache: str | None = None  # the keyword that carried the KV cache, for messages
    positions: bool = False  # position_ids travelled with the step (the second signal)
    plan: BatchPlan | None = None  # continuous batching: the requests packed into this forward


class StepSink:
    """Per-forward-step slots, one per MoE layer, filled by the routing hooks on the device.

    ``record`` is the whole per-layer cost: a reference into a slot. It never reads a value back to
    the host; :class:`~moeprof.capture.pipe.HostPipe` gathers the slots.
    """

    def __init__(self, num_layers: int, weights: bool) -> None:
        self.num_layers = num_layers
        self.weights = weights
        self.ids: list[torch.Tensor | None] = [None] * num_layers
        self.w: list[torch.Tensor | None] = [None] * num_layers
        self.active = False
        self._devices: bool | None = None  # the layers' outputs lie on more than one device
        self._empty = [None] * num_layers

    def reset(self) -> None:
        # In place: compiled code guards on these lists, so they must stay the same objects.
        self.ids[:] = self._empty
        self.w[:] = self._empty
        self.active = True

    def record(self, ordinal: int, ids: torch.Tensor, weights: torch.Tensor | None) -> None:
        # Only a reference: no kernel, no sync. The tensors stay valid until ``pack`` runs at the end
        # of the same forward (also under CUDA-graph replay, whose outputs live until the next replay).
        self.ids[ordinal] = ids
        if self.weights:
            self.w[ordinal] = weights

    def missing(self) -> list[int]:
        return [i for i, t in enumerate(self.ids) if t is None]

    def on_devices(self, device: torch.device) -> tuple[list, list | None]:
        """The slots on ``device``: a model spread over devices (``device_map``) gathers them there."""
        ids, w = self.ids, self.w if self.weights else None
        if self._devices is None:
            self._devices = len({t.device for t in ids}) > 1 or ids[0].device != device
        if self._devices:
            ids = [t.to(device) for t in ids]
            w = [t.to(device) for t in w] if w is not None else None
        return ids, w


class Recorder:
    """A running capture. Made by :func:`capture`; use it as a context manager.

    ``new_request(domain=..., dataset=..., text=...)`` labels the next batch row to start (call it
    once per row, in row order, before ``generate``); rows without a label become requests with the
    current default labels (:meth:`set_labels`). Request ids count up from 0 in the order requests
    are labelled or started.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: MoeLayout,
        writer: TraceWriter,
        *,
        domain: str | None,
        dataset: str | None,
        eos_token_id: Any,
        weights: bool,
        buffer_rows: int,
        flush_seconds: float = 5.0,
    ) -> None:
        self.model = model
        self.layout = layout
        self.writer = writer
        self._default_domain = domain or DEFAULT_DOMAIN
        self._default_dataset = dataset
        self._eos = _eos_set(eos_token_id)
        self._weights = weights
        self._buffer_rows = max(1, int(buffer_rows))
        self._top_k = layout.info.top_k
        self._layers = np.asarray([p.layer for p in layout.points], dtype=np.int16)
        self._sink = StepSink(len(layout.points), weights)
        self._handles: list[Any] = []
        self._next_request = 0
        self._labels: list[_Label] = []
        self._keyed: dict[str, _Label] = {}
        self._requests: dict[int, _Request] = {}
        self._by_key: dict[str, _Request] = {}  # continuous batching: the engine's request id -> request
        self._dirty: set[int] = set()  # requests whose counts changed since the writer last saw them
        # The running batch, one entry per batch row, as arrays (no per-row Python in a step).
        self._batch: list[_Request] | None = None
        self._rid = self._pos = self._prompt = self._decode = np.zeros(0, np.int64)
        self._finished = np.zeros(0, bool)
        # position_ids of each row's last token so far; None when a step came without them
        self._last_position: np.ndarray | None = None
        self._eos_ids = np.fromiter(sorted(self._eos), np.int64)
        self._batch_step = 0
        self._forwards = 0
        self._meta: _StepMeta | None = None
        self._inputs: tuple | None = None  # (input_ids, position_ids, attention_mask, device) of the step
        self._tap = PlanTap()
        self._flush_seconds = float(flush_seconds)
        self._last_handoff = time.monotonic()
        self._pipe = HostPipe(self._process_steps, max_block=128)
        self._constants: dict[tuple, torch.Tensor] = {}
        self._batch_running = False
        self._static_cache = False  # the step's KV cache is static: compiled decoding, CUDA graphs
        self._compileable_ref: Any = None  # the last cache found compileable (see _compileable)
        self._staged: list[dict[str, np.ndarray]] = []
        self._staged_rows = 0
        self.steps = 0
        """Forward steps fully recorded (handed to the host side)."""
        self.rows = 0
        """Routing rows produced so far (staged or written)."""
        self._closed = False
        self._compiled: tuple[Any, Any, Any] | None = None  # (compile config, the capture's compiled call, its code)
        self._in_compiled = False  # the capture's compiled call is running: the top-level hooks stand aside
        self._saw_compiled = False  # some step ran compiled: its weights may be rounded differently
        self._want_paused = False  # pause() asked for; takes effect at the next batch of new sequences
        self._paused = False  # the running batch is not being recorded
        self._hooks_off: _HooksOff | None = None  # the capture's hooks, taken off the model while paused
        # taking them off (the model's thread, as a paused batch starts) against putting them back (resume(),
        # any thread): a resume() between a batch's start and the hooks coming off would otherwise find
        # nothing to put back, and they would stay off for the next recorded batch
        self._hooks_lock = threading.Lock()

    # -- public API ---------------------------------------------------------------------------------
    @property
    def out(self) -> Path:
        return self.writer.out

    @property
    def manifest(self) -> Manifest:
        return self.writer.manifest

    def new_request(
        self,
        *,
        domain: str | None = None,
        dataset: str | None = None,
        text: str | None = None,
        key: str | None = None,
    ) -> int:
        """Label a request; return its request id in the trace.

        Without ``key``, the label goes to the next batch row to start (``generate()``: rows in order).
        With ``key``, it goes to the continuous-batching request of that id (the ``request_id`` given to
        ``manager.add_request``), whenever the scheduler starts it.
        """
        label = self._label(domain, dataset, text)
        if key is None:
            self._labels.append(label)
        else:
            if str(key) in self._keyed or str(key) in self._by_key:
                raise CaptureError(f"capture: request key {key!r} was labelled twice")
            self._keyed[str(key)] = label
        return label.request_id

    def set_labels(self, *, domain: str | None = None, dataset: str | None = None) -> None:
        """Change the labels given to rows started without :meth:`new_request`."""
        if domain is not None:
            self._default_domain = domain
        self._default_dataset = dataset

    def pause(self) -> None:
        """Stop recording from the next batch on: the next ``generate()`` call (a batch of new
        sequences) and those after it run as if no capture were there, until :meth:`resume`. A batch
        already running is recorded to its end, so every request in the trace is whole.

        When the first batch of a pause starts, the capture takes its hooks off the model (every one,
        the model's and each MoE layer's), so a paused batch runs the model's own code with nothing of
        the capture in it: eager decoding calls no hook, compiled decoding runs the model's own compiled
        call. :meth:`resume` puts the same hooks back under the same keys, in the same order, so code
        compiled with guards on them (a caller's compiled module) still matches and is not compiled
        again. For sampling a
        long-running server (record one batch in N) and for timing a capture against no capture in one
        warm process. ``pause()`` and ``resume()`` may be called from any thread, the model's own (a
        stopping criterion, a streamer) or another: either takes effect from the next batch on; a
        ``resume()`` that meets a paused batch starting leaves the hooks on. Continuous batching (``generate_batch``)
        cannot be paused: a packed batch that runs while paused is an error, raised at the next
        recorded step and at :meth:`close`.
        """
        self._want_paused = True

    def resume(self) -> None:
        """Record again from the next batch of new sequences on (undoes :meth:`pause`). May be called
        from any thread: the hooks go back at once; a batch that started paused stays unrecorded."""
        with self._hooks_lock:
            self._want_paused = False
            if self._hooks_off is not None:
                self._hooks_off.put_back()
                self._hooks_off = None
                self._tap.refuse = None

    @property
    def paused(self) -> bool:
        """Whether the capture is paused, or will be from the next batch on."""
        return self._want_paused

    def flush(self) -> None:
        """Write every finished step to disk now (the trace stays marked incomplete until close)."""
        self._pipe.drain()
        self._write_staged()
        self._sync_requests()
        self.writer.flush()

    def start(self) -> "Recorder":
        if self._handles:
            return self
        self._prepare_for_compile()
        self._tap.install()
        # The top-level hooks do host-side work. Compiled decoding through transformers' compiled call
        # runs that work around the capture's own compiled call (:meth:`_compiled_call`); a forward
        # compiled some other way (``model.compile()``, a caller's compiled module) runs it eagerly at
        # the edges of its graph (a graph break before, one after). The per-layer hooks are traced into
        # the graph either way, so CUDA-graph replay still records every layer of every step.
        top_pre = self.model.register_forward_pre_hook(_top_level(self, self._on_forward_start), with_kwargs=True)
        top_post = self.model.register_forward_hook(_top_level(self, self._on_forward_end), with_kwargs=True)
        self._handles += [top_pre, top_post]
        for ordinal, point in enumerate(self.layout.points):
            self._handles.append(_attach(point, ordinal, self._sink))
        return self

    def close(self, complete: bool = True) -> Manifest:
        """Remove the hooks, write every finished step and the final manifest."""
        if self._closed:
            return self.writer.manifest
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooks_off = None
        self._tap.remove()
        self._restore_compile_settings()
        error: BaseException | None = None
        try:
            if self._tap.error is not None:
                raise self._tap.error
            self._pipe.close()  # may raise at a step it cannot place, after recording the steps before it
        except BaseException as e:
            error = e
        finally:
            self._pipe.shutdown()
        if self._weights and self._saw_compiled:
            self.writer.manifest.notes.append(COMPILED_WEIGHTS_NOTE)
        try:
            self._write_staged()
            self._sync_requests()
        except BaseException as e:
            error = error or e
        if error is not None:
            self.writer.close(complete=False)
            raise error
        return self.writer.close(complete=complete)

    def __enter__(self) -> "Recorder":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)

    # -- torch.compile ----------------------------------------------------------------------------
    def _prepare_for_compile(self) -> None:
        """Make sure no compiled code runs the model without our hooks, and leave the model's own
        compiled code alone.

        Dynamo installs no guards on module hooks by default (``skip_nnmodule_hook_guards``), so code
        compiled before capture started would replay without them and record nothing, silently.
        While capturing, hooks are guarded, and transformers' ``get_compiled_call`` hands out the
        capture's own compiled call (:meth:`_compiled_call`), compiled with a backend equal to no other:
        code compiled before the capture does not match it, and stays for after the capture.
        """
        try:
            import torch._dynamo as dynamo
        except ImportError:  # pragma: no cover - torch without dynamo
            self._saved_hook_guards = None
            return
        self._saved_hook_guards = dynamo.config.skip_nnmodule_hook_guards
        dynamo.config.skip_nnmodule_hook_guards = False
        if callable(getattr(type(self.model), "get_compiled_call", None)):
            self._saved_get_compiled = _own_attrs(self.model, "get_compiled_call")
            self.model.get_compiled_call = self._compiled_call

    def _restore_compile_settings(self) -> None:
        saved = getattr(self, "_saved_get_compiled", None)
        if saved is not None:
            _put_back(self.model, saved)
            self._saved_get_compiled = None
        self._drop_compiled()
        if getattr(self, "_saved_hook_guards", None) is not None:
            import torch._dynamo as dynamo

            dynamo.config.skip_nnmodule_hook_guards = self._saved_hook_guards

    def _compiled_call(self, compile_config: Any) -> Any:
        """transformers' ``get_compiled_call`` while capturing: the same compilation, but the capture's own.

        The model's method decides whether and how to compile (its default config, models it never
        compiles); its ``_compiled_call`` and ``_last_compile_config`` are put back as they were, so the
        model's compiled code is untouched and runs again, not re-traced, after the capture. The capture
        compiles ``model.__call__`` with the same settings, through a function of its own (its compiled
        code is dropped when the capture ends) and a backend object equal only to itself (dynamo reuses
        code compiled before, without the hooks, only under an equal backend). Its top-level
        bookkeeping runs around the compiled call, in plain Python: no ``torch._dynamo.disable``
        wrapper to pay per step.
        """
        model = self.model
        if self._want_paused:  # generate() asks once per call: this call runs as without a capture
            return type(model).get_compiled_call(model, compile_config)
        if self._compiled is not None and self._compiled[0] == compile_config:
            return self._compiled[1]
        keep = _own_attrs(model, "_compiled_call", "_last_compile_config")
        plain = type(model).get_compiled_call(model, compile_config)
        config = model.__dict__.get("_last_compile_config")
        _put_back(model, keep)
        if not hasattr(plain, "_torchdynamo_orig_callable") or config is None:
            return plain  # this model is not compiled (transformers skips some): the hooks run eagerly
        own = _own_code(model.__call__)
        compiled = torch.compile(own, backend=_distinct_backend(config), fullgraph=config.fullgraph,
                                 dynamic=config.dynamic, options={"guard_filter_fn": self._own_hook_guards_dropped})

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._closed:  # kept by a caller past the capture: the model's own compiled call
                return model.get_compiled_call(compile_config)(*args, **kwargs)
            if self._decoding_on(args, kwargs):
                # a one-token step of the running batch on its static cache: nothing decided before the
                # launch, so the step's bookkeeping runs after it, while the GPU runs the step (it stood
                # before the CUDA graph's replay, about 25 µs of the step on an H200's host)
                self._sink.reset()
                self._saw_compiled = self._in_compiled = True
                try:
                    out = compiled(*args, **kwargs)
                finally:
                    self._in_compiled = False
                self._on_forward_start(model, args, kwargs, launched=True)
                self._on_forward_end(model, args, kwargs, out)
                return out
            self._on_forward_start(model, args, kwargs)
            if self._hooks_off is not None:
                # a paused batch started through this call, kept by its caller (generate() asks for one per
                # call): the model's own compiled call, as generate() gets it while paused (the capture's
                # code, with its hooks off the model, would fail its guards and be compiled again)
                return type(model).get_compiled_call(model, compile_config)(*args, **kwargs)
            self._saw_compiled = self._in_compiled = True
            try:
                out = compiled(*args, **kwargs)
            finally:
                self._in_compiled = False
            self._on_forward_end(model, args, kwargs, out)
            return out

        self._drop_compiled()
        self._compiled = (compile_config, call, own.__code__)
        return call

    def _own_hook_guards_dropped(self, entries: Sequence[Any]) -> list[bool]:
        """The guard filter of the capture's own compiled code: keep every guard but those on what the
        capture's hooks close over (its sink, routing points, layer ordinals, the recorder) and on their code,
        and those on empty module hook dicts.

        Empty hook dicts: dynamo guards them only while ``skip_nnmodule_hook_guards`` is off, as it is
        during the capture for everyone else's compiled code; checking six dicts of every module cost
        about 45 µs a step (12-layer Qwen3 shape, H200). Dropped here rather than by turning the setting
        on around each call (4.2–4.8 µs on a CPU, before every launch).

        That code lives as long as the capture and its hooks, which are neither replaced nor changed while
        it lives, and nothing the hooks read through their closures changes the graph while they run in it
        (traced, a routing hook records whatever ``sink.active`` is; ``_in_compiled`` is always set in that
        call). Each hook's guards repeat that chain of attributes (about 18 lines of guard tree a MoE
        layer), checked before every compiled step. A hook dict that also holds someone else's hook keeps all its guards, and so does
        every dict's own guard (its keys: a hook added or removed still fails it).
        """
        own = {h.id for h in self._handles}
        mine: dict[tuple[str, str], bool] = {}

        def is_mine(path: str, attr: str) -> bool:
            key = (path, attr)
            if key not in mine:
                try:
                    hooks = getattr(self.model.get_submodule(path), attr)
                    mine[key] = bool(hooks) and all(k in own for k in hooks)
                except (AttributeError, TypeError):
                    mine[key] = False
            return mine[key]

        keep = []
        for entry in entries:
            if entry.guard_type == "EMPTY_NN_MODULE_HOOKS_DICT":
                keep.append(False)
                continue
            m = _OWN_HOOK_GUARD.match(entry.name)
            path = ".".join(_MODULE_KEY.findall(m.group(1))) if m else ""
            keep.append(not (m and is_mine(path, m.group(2))))
        return keep

    def _drop_compiled(self) -> None:
        """Free the capture's compiled code: dynamo holds it (and its CUDA graphs) until its code's cache is reset."""
        if self._compiled is not None:
            from torch._dynamo.eval_frame import remove_from_cache

            remove_from_cache(self._compiled[2])
            self._compiled = None

    # -- top-level hooks ------------------------------------------------------------------------------
    def _decoding_on(self, args: tuple, kwargs: dict) -> bool:
        """True for a one-token step of the running batch on the static cache it started on, recording:
        a decode step of compiled decoding, whose bookkeeping may wait until after its launch (no
        pause decided, no cache length read; :meth:`_on_forward_start` checks it all again after)."""
        if self._want_paused or self._paused or not self._batch_running or self._tap.error is not None:
            return False
        ref = _step_inputs(args, kwargs)[1]
        if ref is None or ref.shape[1] != 1 or is_packed_forward(kwargs):
            return False
        known = self._compileable_ref
        return known is not None and known() is _find_cache(kwargs)[1]

    def _on_forward_start(self, module: nn.Module, args: tuple, kwargs: dict, launched: bool = False) -> None:
        """The step's bookkeeping: which batch, recorded or not. ``launched``: the step already ran
        (:meth:`_decoding_on`), its routing is in the sink's slots."""
        if self._tap.error is not None:
            raise self._tap.error
        input_ids, ref = _step_inputs(args, kwargs)
        if ref is None:
            raise CaptureError("capture: the model was called without input_ids or inputs_embeds")
        b, s = int(ref.shape[0]), int(ref.shape[1])
        # Only references and host-side decisions here: this runs before the forward's kernels are
        # launched (before the CUDA graph is replayed), so any kernel launched here delays the whole
        # step. The conversions run in _on_forward_end, after the launch, overlapping the GPU.
        position_ids = kwargs.get("position_ids")
        has_positions = isinstance(position_ids, torch.Tensor) and tuple(position_ids.shape) in {(b, s), (1, s)}
        mask: Any = None
        if is_packed_forward(kwargs):
            if self._want_paused or self._paused:
                # raised here and again at close: the engine's loop turns an error in a forward into
                # failed requests, and the caller would not see it
                self._tap.error = self._tap.error or CaptureError(_CANNOT_PAUSE)
                raise self._tap.error
            meta = self._packed_step(b, s)
            if meta is None:  # the engine's warm-up pass: fake requests, nothing to record
                self._meta = None
                return
        else:
            if self._paused and self._want_paused and s == 1:
                self._meta = None  # a decode step of a paused batch (no cache length read: no sync)
                return
            cache_name, cache = _find_cache(kwargs)
            new_sequences = self._starts_new_sequences(cache, s)
            if new_sequences:
                self._paused = self._want_paused
            if self._paused:
                self._meta = None
                if new_sequences:
                    self._take_hooks_off()
                return
            self._static_cache = self._compileable(cache)
            mask = kwargs.get("attention_mask")
            labels: list[_Label] = []
            if new_sequences:
                labels, self._labels = self._labels[:b], self._labels[b:]
                labels += [self._label(None, None, None) for _ in range(b - len(labels))]
                self._batch_running = True
            meta = _StepMeta(self._forwards, b, s, new_sequences, labels, cache=cache_name)
        meta.positions = has_positions
        self._meta = meta
        self._forwards += 1
        self._inputs = (input_ids, position_ids if has_positions else None, mask, ref.device)
        if launched:
            self._sink.active = True
        else:
            self._sink.reset()

    def _take_hooks_off(self) -> None:
        """Take every hook of the capture off the model for a paused batch (:meth:`pause`); the
        continuous-batching tap refuses batches until :meth:`resume` puts them back. A :meth:`resume`
        from another thread since this batch started leaves them on (the batch still records nothing)."""
        with self._hooks_lock:
            if self._hooks_off is None and self._want_paused:
                self._hooks_off = _HooksOff.take(self._handles)
                if self._hooks_off is None:  # a torch whose hook handles this does not know: they stay on
                    return
                self._tap.refuse = CaptureError(_CANNOT_PAUSE)

    def _packed_step(self, b: int, s: int) -> _StepMeta | None:
        plan = self._tap.pop()
        if plan is None:
            why = (
                "start the capture before generate_batch() / init_continuous_batching()"
                if self._tap.supported
                else "this transformers version builds batches in a way moeprof does not know"
            )
            raise CaptureError(
                f"capture: a packed forward pass (continuous batching, transformers {_transformers_version()}) "
                f"arrived with no record of which requests it carries: {why}"
            )
        if plan.warmup:
            return None
        if b != 1 or plan.tokens > s:
            raise CaptureError(
                f"capture: continuous batching scheduled {plan.tokens} tokens of {len(plan.keys)} request(s), "
                f"but the forward pass received a batch of {b} x {s} tokens"
            )
        return _StepMeta(self._forwards, b, s, new_sequences=False, plan=plan)

    def _compileable(self, cache: Any) -> bool:
        """``cache.is_compileable``, remembered for the cache object once True: transformers computes it
        over every layer on each read, and it was read twice before each step's launch (a third of the
        forward-start bookkeeping). A cache's layers are not removed, so a True answer stays true; a
        False one is read again (a dynamic cache starts with no layers, False)."""
        known = self._compileable_ref
        if known is not None and known() is cache:
            return True
        if not getattr(cache, "is_compileable", False):
            return False
        try:
            self._compileable_ref = weakref.ref(cache)  # a weak reference: a finished batch's cache is freed
        except TypeError:
            pass
        return True

    def _starts_new_sequences(self, past: Any, s: int) -> bool:
        """True when this forward starts new sequences (a prefill): the KV cache is empty or absent.

        A dynamic cache reports its length as an int. A static (compileable) cache reports a device
        tensor once initialised; reading it costs a host sync, so it is read only for multi-token
        steps or when no batch is running, and a one-token step of a running batch is a decode step.
        The host side checks the answer against the step's position_ids (:meth:`_check_positions`).
        """
        if past is None or not hasattr(past, "get_seq_length"):
            return True
        if s == 1 and self._batch_running and self._compileable(past):
            return False  # a static cache's length is a device value: reading it would launch and sync
        length = past.get_seq_length()
        if isinstance(length, torch.Tensor):
            if s == 1 and self._batch_running:
                return False
            length = int(length)
        return length == 0

    def _on_forward_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        meta, sink = self._meta, self._sink
        if meta is None or not sink.active:
            return
        sink.active = False
        self._meta = None
        missing = sink.missing()
        if missing:
            names = ", ".join(self.layout.points[i].path for i in missing[:3])
            raise CaptureError(f"capture: MoE layer(s) {names} did not run in this forward pass")
        shape = tuple(sink.ids[0].shape)
        if shape != (meta.b * meta.s, self._top_k):
            raise CaptureError(
                f"capture: {self.layout.points[0].path} received ids of shape {shape}, expected "
                f"({meta.b * meta.s}, {self._top_k}) for a batch of {meta.b} x {meta.s} tokens"
            )
        input_ids, position_ids, mask, device = self._inputs
        self._inputs = None
        # The step's small parts as (b, s) int64 tensors, as they come: the pipe stacks them into
        # (rows, b, s) views, so no reshape call is paid per step.
        b, s = meta.b, meta.s
        small = [_int64(input_ids) if input_ids is not None else self._filled((b, s), -1, device)]
        if position_ids is not None:
            small.append(_int64(position_ids if position_ids.shape[0] == b else position_ids.expand(b, s)))
        if meta.plan is not None or mask is None:
            small.append(self._filled((b, s), 1, device))
        else:
            small.append(_token_validity(mask, b, s, meta.new_sequences, device, self._filled))
        ids, weights = sink.on_devices(device)
        # One-token decode steps go to the host a block at a time: held by reference in eager decoding,
        # copied into a block buffer as they end otherwise (a static cache means compiled decoding,
        # whose CUDA graphs reuse their outputs).
        decode = self._decode_shaped(meta) and not sink._devices
        self._pipe.submit(meta, ids, weights, small, deferrable=decode and not self._static_cache, decode=decode)

    def _filled(self, shape: tuple[int, int], value: int, device: torch.device) -> torch.Tensor:
        """A constant int64 device tensor of ``shape``, made once per shape (no kernel launch per step)."""
        key = (shape, value, device)
        t = self._constants.get(key)
        if t is None:
            if len(self._constants) > 64:
                self._constants.clear()
            t = self._constants[key] = torch.full(shape, value, dtype=torch.int64, device=device)
        return t

    # -- host side (the pipe's worker thread) -----------------------------------------------------------

    def _process_steps(self, steps: list[Step]) -> None:
        """Process finished steps in order: runs of one-token decode steps of the running batch as
        one block (:meth:`_process_decode_block`), every other step on its own."""
        i = 0
        while i < len(steps):
            meta = steps[i][0]
            j = i + 1
            if self._decode_shaped(meta):
                while j < len(steps) and self._decode_shaped(steps[j][0]) and steps[j][0].b == meta.b \
                        and steps[j][0].positions == meta.positions:
                    j += 1
            if j - i > 1 and self._batch is not None and len(self._batch) == meta.b:
                self._process_decode_block(steps[i:j])
            else:
                for step in steps[i:j]:
                    self._process(step)
            i = j

    @staticmethod
    def _decode_shaped(meta: _StepMeta) -> bool:
        return meta.plan is None and not meta.new_sequences and meta.s == 1

    def _process(self, step: Step) -> None:
        meta, ids, weights, tokens, positions, valid = step
        if meta.plan is not None:
            self._process_packed(meta, ids, weights, tokens, positions)
            return

        # Step 1: which requests the batch rows serve (checked against position_ids first: a step
        # that cannot be placed starts no request).
        given = positions.reshape(meta.b, meta.s) if positions is not None else None
        if meta.new_sequences:
            if given is not None:
                self._check_positions(meta, given, valid, valid)
            self._start_batch(meta)
        elif self._batch is None or len(self._batch) != meta.b:
            have = "no running batch" if self._batch is None else f"a running batch of {len(self._batch)} rows"
            raise CaptureError(
                f"capture: a decode step of {meta.b} rows arrived with {have}; start capture before the "
                "prefill and keep batch rows fixed for a sequence's lifetime (generate() does)"
            )
        else:
            self._batch_step += 1

        # Step 2: drop padding and tokens after a row's EOS; positions count kept tokens only.
        keep = valid & ~self._finished[:, None]
        kept = keep.sum(axis=1)
        pos = self._pos[:, None] + np.cumsum(keep, axis=1) - 1
        if given is not None and not meta.new_sequences:
            self._check_positions(meta, given, keep, valid)
        elif given is None:
            self._last_position = None
        self._pos += kept
        if meta.new_sequences:
            self._prompt += kept
        else:
            self._decode += kept
            if self._eos_ids.size:
                last = tokens.reshape(meta.b, meta.s)[:, -1]
                self._finished |= (kept > 0) & np.isin(last, self._eos_ids)

        # Step 3: rows of the trace, layer-major.
        idx = np.flatnonzero(keep.reshape(-1))
        m = idx.size
        if m == 0:
            self.steps += 1
            return
        request_of_token = np.repeat(self._rid, meta.s)
        step = np.int32(self._batch_step)
        phase = "prefill" if self._batch_step == 0 else "decode"
        self._stage_rows(meta, idx, ids, weights, tokens, request_of_token[idx], step, phase, pos.reshape(-1)[idx])
        self.steps += 1

    def _process_decode_block(self, steps: list[Step]) -> None:
        """``T`` one-token decode steps of the running batch at once: what :meth:`_process` does for
        each in turn, vectorised over the steps (a row's EOS ends it for the later steps of the block).

        A step whose positions do not continue its row is not handled here: the block is then
        processed step by step, which records the good steps before it and raises at the bad one.
        """
        T, b = len(steps), steps[0][0].b
        parts = [p[1:] for p in steps]  # (ids, weights, tokens, positions, valid) of each step
        valid = np.stack([p[4][:, 0] for p in parts])  # (T, b)
        tokens = np.stack([p[2] for p in parts])  # (T, b)
        given = np.stack([p[3] for p in parts]).astype(np.int64) if steps[0][0].positions else None
        fin0 = self._finished
        if self._eos_ids.size:
            hit = valid & np.isin(tokens, self._eos_ids) & ~fin0
            first = np.where(hit.any(axis=0), hit.argmax(axis=0), T)  # a row's first kept EOS
            finished = fin0 | (np.arange(T)[:, None] > first)  # (T, b): finished before step t
        else:
            first, finished = None, np.broadcast_to(fin0, (T, b))
        keep = valid & ~finished
        if given is not None:
            prev = np.empty_like(given)
            prev[1:] = given[:-1]
            checked = keep.copy()
            if self._last_position is not None and len(self._last_position) == b:
                prev[0] = self._last_position
            else:
                checked[0] = False
            if (checked & (given != prev + 1)).any():
                for step in steps:
                    self._process(step)
                return
        pos = self._pos + np.cumsum(keep, axis=0) - keep  # (T, b): position of each kept token
        kept = keep.sum(axis=0)
        step0 = self._batch_step
        self._batch_step += T
        self._pos += kept
        self._decode += kept
        if first is not None:
            self._finished = fin0 | (first < T)
        self._last_position = given[-1] if given is not None else None
        self.steps += T
        m = int(kept.sum())
        if m == 0:
            return
        L, k = len(self.layout.points), self._top_k
        sel = np.broadcast_to(keep[:, None, :], (T, L, b)).reshape(-1)
        whole = m == T * b

        def rows(x: np.ndarray) -> np.ndarray:  # (T, L, b) broadcast -> kept rows, (step, layer, token) order
            flat = np.broadcast_to(x, (T, L, b)).reshape(-1)
            return flat.copy() if whole else flat[sel]

        ids = np.stack([p[0] for p in parts]).reshape(T * L * b, k)
        weights = np.stack([p[1] for p in parts]).reshape(T * L * b, k) if self._weights else None
        batch_ids = np.fromiter((step[0].batch_id for step in steps), np.int64, T)
        chunk = {
            "request_id": rows(self._rid[None, None, :]),
            "step": rows((step0 + 1 + np.arange(T, dtype=np.int32))[:, None, None]),
            "phase": "decode",
            "pos": rows(pos.astype(np.int32)[:, None, :]),
            "layer": rows(self._layers[None, :, None]),
            "experts": ids if whole else ids[sel],
            "weights": None if weights is None else (weights if whole else weights[sel]),
            "batch_id": rows(batch_ids[:, None, None]),
            "token_id": None if (tokens[keep] < 0).any() else rows(tokens[:, None, :]),
        }
        self._stage(chunk, L * m)

    def _check_positions(self, meta: _StepMeta, given: np.ndarray, keep: np.ndarray, valid: np.ndarray) -> None:
        """Cross-check the cache signal with the step's position_ids, row by row; ``(b, s)`` arrays.

        In a prefill, a request's first real token has position 0 (generate() derives position_ids
        from the padding mask) or its amount of left padding (an own loop passing ``arange``). In a
        decode step, a row's positions go on from the last position of its previous step. A "prefill"
        whose position_ids continue a sequence is a decode step whose KV cache this capture did not
        see: recording it as new requests would write junk, so it is an error, as is a decode step
        that does not continue its row.
        """
        rows = np.flatnonzero(keep.any(axis=1))
        version = _transformers_version()
        if meta.new_sequences and rows.size:
            first = keep[rows].argmax(axis=1)
            given_first = given[rows, first]
            pads_before = first - valid[rows, : first.max() + 1].cumsum(axis=1)[np.arange(rows.size), first] + 1
            ok = (given_first == 0) | (given_first == pads_before)
            if not ok.all():
                i = int(np.argmin(ok))
                where = (
                    f"the KV cache passed as `{meta.cache}` is empty"
                    if meta.cache
                    else "no KV cache was among the forward's arguments (looked for `cache`, `past_key_values` "
                    "and any argument with get_seq_length())"
                )
                raise CaptureError(
                    f"capture: forward pass {meta.batch_id}: {where}, so it would start new requests, but the "
                    f"position_ids of batch row {int(rows[i])} start at {int(given_first[i])}: it continues a "
                    f"sequence (transformers {version}). moeprof does not record steps it cannot place; if "
                    "this transformers version passes the cache under a new name, please report it"
                )
        elif rows.size and self._last_position is not None and len(self._last_position) == len(given):
            ok = given[rows, 0] == self._last_position[rows] + 1
            if not ok.all():
                i = int(np.argmin(ok))
                raise CaptureError(
                    f"capture: forward pass {meta.batch_id} (decode, KV cache `{meta.cache}`): batch row "
                    f"{int(rows[i])} has position_ids {int(given[rows[i], 0])}, but its previous step ended at "
                    f"{int(self._last_position[rows[i]])} (transformers {version}): the running batch and the "
                    "model's inputs disagree"
                )
        self._last_position = given[:, -1].astype(np.int64)

    def _process_packed(
        self,
        meta: _StepMeta,
        ids: np.ndarray,
        weights: np.ndarray | None,
        tokens: np.ndarray,
        positions: np.ndarray | None,
    ) -> None:
        """Rows of a continuous-batching forward: each request's slice of the packed tokens.

        Within a request, positions below its prompt length are prefill (step 0, chunked or not), the
        rest decode (step = position - prompt + 1, as generate() counts). Tokens recomputed after the
        engine dropped a request's KV cache are recorded once only.
        """
        plan = meta.plan
        assert plan is not None
        q = plan.tokens
        start = np.repeat(np.cumsum(plan.query) - plan.query, plan.query)
        expected = np.repeat(plan.past, plan.query) + np.arange(q) - start
        if positions is not None and (positions[:q] != expected).any():
            j = int(np.argmax(positions[:q] != expected))
            key = plan.keys[int(np.searchsorted(np.cumsum(plan.query), j, side="right"))]
            raise CaptureError(
                f"capture: forward pass {meta.batch_id}: token {j} has position_ids {int(positions[j])}, but the "
                f"scheduler placed request {key!r} at position {int(expected[j])} there (transformers "
                f"{_transformers_version()}); the batch plan and the model's inputs disagree"
            )
        requests = [self._keyed_request(key, meta) for key in plan.keys]
        next_pos = np.fromiter((r.next_pos for r in requests), np.int64, len(requests))
        gap = (plan.past > next_pos) & (next_pos > 0)
        if gap.any():
            i = int(np.argmax(gap))
            raise CaptureError(
                f"capture: request {plan.keys[i]!r} resumed at position {int(plan.past[i])} but was recorded up to "
                f"{int(next_pos[i])}: positions are not contiguous"
            )
        for i in np.flatnonzero((plan.past > 0) & (next_pos == 0)):
            self.writer.manifest.notes.append(
                f"request {plan.keys[i]!r}: its first {int(plan.past[i])} prompt tokens came from the engine's "
                "prefix cache and have no routing rows"
            )
        prompt = np.repeat(plan.prompt, plan.query)
        keep = expected >= np.repeat(next_pos, plan.query)
        decode = expected >= prompt
        ends = np.cumsum(plan.query)
        for i, request in enumerate(requests):
            self._dirty.add(request.label.request_id)
            sl = slice(int(ends[i] - plan.query[i]), int(ends[i]))
            kept = keep[sl]
            request.prompt_tokens += int((kept & ~decode[sl]).sum())
            request.decode_tokens += int((kept & decode[sl]).sum())
            request.next_pos = max(request.next_pos, int(plan.past[i] + plan.query[i]))
        idx = np.flatnonzero(keep)
        m = idx.size
        self.steps += 1
        if m == 0:
            return
        rids = np.repeat(np.fromiter((r.label.request_id for r in requests), np.int64, len(requests)), plan.query)
        step = np.where(decode, expected - prompt + 1, 0).astype(np.int32)
        self._stage_rows(meta, idx, ids, weights, tokens, rids[idx], step[idx], decode[idx].astype(np.int8), expected[idx])

    def _stage_rows(self, meta, idx, ids, weights, tokens, request_id, step, phase, pos) -> None:
        """Stage the rows of the kept tokens ``idx`` of one step, layer-major. ``request_id``, ``pos``
        and (unless scalars) ``step`` and ``phase`` are per kept token; ``ids`` is ``(L, n, k)``."""
        L, k, m = ids.shape[0], ids.shape[2], idx.size
        whole = m == ids.shape[1]  # every token kept (no padding, no EOS): plain copies, no gathers

        def per_row(x: Any) -> Any:
            return x if np.ndim(x) == 0 or isinstance(x, str) else np.broadcast_to(x, (L, m)).reshape(-1)

        def gather(x: np.ndarray) -> np.ndarray:  # (L, n, k) -> rows of the kept tokens; a copy, never a view
            return (x.copy() if whole else x[:, idx, :]).reshape(L * m, k)

        token_id = tokens if whole else tokens[idx]
        chunk = {
            "request_id": per_row(request_id),
            "step": per_row(step),
            "phase": per_row(phase),
            "pos": per_row(np.asarray(pos, np.int32)),
            "layer": np.repeat(self._layers, m),
            "experts": ids.reshape(L * m, k) if whole else ids[:, idx, :].reshape(L * m, k),  # ids: own array
            "weights": None if weights is None else gather(weights),  # a view of a reused buffer: copied
            "batch_id": np.int64(meta.batch_id),
            "token_id": None if (token_id < 0).any() else per_row(token_id),
        }
        self._stage(chunk, L * m)

    def _keyed_request(self, key: str, meta: _StepMeta) -> _Request:
        request = self._by_key.get(key)
        if request is None:
            label = self._keyed.pop(key, None)
            if label is None:
                label = self._labels.pop(0) if self._labels else self._label(None, None, None)
            request = _Request(label)
            self._by_key[key] = request
            self._requests[label.request_id] = request
        return request

    def _start_batch(self, meta: _StepMeta) -> None:
        self._sync_requests()
        self._batch_step = 0
        self._batch = [_Request(label) for label in meta.labels]
        for request in self._batch:
            self._requests[request.label.request_id] = request
        b = len(self._batch)
        self._rid = np.fromiter((r.label.request_id for r in self._batch), np.int64, b)
        self._pos, self._prompt, self._decode = (np.zeros(b, np.int64) for _ in range(3))
        self._finished = np.zeros(b, bool)

    def _label(self, domain: str | None, dataset: str | None, text: str | None) -> _Label:
        label = _Label(
            request_id=self._next_request,
            domain=domain or self._default_domain,
            dataset=dataset if dataset is not None else self._default_dataset,
            text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest() if text is not None else None,
        )
        self._next_request += 1
        return label

    def _stage(self, chunk: dict[str, Any], n: int) -> None:
        self._staged.append(chunk)
        self._staged_rows += n
        self.rows += n
        if self._staged_rows >= self._buffer_rows:
            self._write_staged()
        elif time.monotonic() - self._last_handoff >= self._flush_seconds:
            # Cut on time as well as on size, so that a capture killed outright (SIGKILL, the OOM
            # killer) keeps what it recorded until a few seconds before. The writer's thread does
            # the writing; this thread only queues the rows and the request.
            self._write_staged()
            self.writer.flush(wait=False)

    def _write_staged(self) -> None:
        if not self._staged:
            return
        staged, rows = self._staged, self._staged_rows
        self._staged, self._staged_rows = [], 0
        self._last_handoff = time.monotonic()
        self._sync_requests()
        # One Arrow conversion per hand-off instead of one per forward step.
        self.writer.write_routing(_concat_chunks(staged, rows))

    def _sync_requests(self) -> None:
        # Only what changed: the running batch and the requests continuous batching touched (a
        # workload of many batches would otherwise cost O(requests) per hand-off).
        for i, request in enumerate(self._batch or ()):
            request.prompt_tokens, request.decode_tokens = int(self._prompt[i]), int(self._decode[i])
            self._dirty.add(request.label.request_id)
        dirty, self._dirty = self._dirty, set()
        for rid in sorted(dirty):
            req = self._requests[rid]
            self.writer.set_request(
                rid,
                req.label.domain,
                dataset=req.label.dataset,
                prompt_tokens=req.prompt_tokens,
                decode_tokens=req.decode_tokens,
                text_sha256=req.label.text_sha256,
            )


def _concat_chunks(chunks: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    """Join staged step chunks (columns, scalars broadcast per chunk) into one chunk of ``rows`` rows."""
    if len(chunks) == 1:
        return chunks[0]
    sizes = [len(c["experts"]) for c in chunks]
    out: dict[str, Any] = {}
    for key in chunks[0]:
        values = [c[key] for c in chunks]
        if key == "phase":
            values = [np.int8(PHASES.index(v)) if isinstance(v, str) else v for v in values]
        if any(v is None for v in values):
            # weights are all or nothing; token ids are absent for steps fed embeddings, and a
            # chunk mixing both kinds of step keeps none of them rather than invent any.
            out[key] = None
            continue
        parts = [np.broadcast_to(v, (n,) + np.shape(v)[1:]) if np.ndim(v) == 0 else v for v, n in zip(values, sizes)]
        out[key] = np.concatenate(parts)
    assert len(out["experts"]) == rows
    return out


def _attach(point: RoutingPoint, ordinal: int, sink: StepSink) -> Any:
    """Register the routing hook of one MoE layer; it only writes into ``sink``'s slot ``ordinal``."""
    if point.kind == "experts_input":

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # Traced, it always records, whatever ``active`` was when traced (is_compiling() is a constant
            # there; the capture's own compiled code drops the guard on ``active``): a compiled step the
            # capture does not record leaves references in the slots, cleared when the next one starts.
            # ``active`` first: a recorded eager step pays no call (about 0.1 µs a layer).
            if sink.active or torch.compiler.is_compiling():
                ids, weights = point.read_inputs(args, kwargs)
                sink.record(ordinal, ids, weights)

        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        if sink.active or torch.compiler.is_compiling():
            ids, weights = point.read_output(output)
            sink.record(ordinal, ids, weights)

    return point.module.register_forward_hook(post_hook)


_CANNOT_PAUSE = ("capture: continuous batching (generate_batch) cannot be paused; call resume() before it, "
                 "or capture it in a capture of its own")


class _HooksOff:
    """Hooks taken off their modules, to be put back under the same keys, in the same order.

    Code compiled with guards on a module's hook dicts (a caller's compiled module, compiled while the
    capture records) checks their keys in order: hooks put back as they were leave it valid (no
    recompile at each resume). Where someone else added or removed a hook on the same module
    meanwhile, ours go back last (that code is compiled again, as it would be for their change alone).
    The capture's own compiled code checks no hook dict, so it must never run while the hooks are off:
    a paused batch gets the model's own compiled call (:meth:`Recorder._compiled_call`).
    """

    def __init__(self, own: set[int], saved: list[tuple[dict, list[tuple[int, Any]]]]) -> None:
        self.own, self.saved = own, saved

    @classmethod
    def take(cls, handles: Sequence[Any]) -> "_HooksOff | None":
        """Take the hooks of ``handles`` (``torch.utils.hooks.RemovableHandle``) off; None, and nothing
        taken, where a handle does not say which dicts hold its hook."""
        if not all(hasattr(h, "hooks_dict_ref") and hasattr(h, "extra_dict_ref") for h in handles):
            return None
        own = {h.id for h in handles}
        saved: list[tuple[dict, list[tuple[int, Any]]]] = []
        seen: set[int] = set()
        for handle in handles:
            for ref in (handle.hooks_dict_ref, *handle.extra_dict_ref):
                hooks = ref()
                if hooks is not None and id(hooks) not in seen:
                    seen.add(id(hooks))
                    saved.append((hooks, list(hooks.items())))
        for hooks, items in saved:
            for key, _ in items:
                if key in own:
                    del hooks[key]
        return cls(own, saved)

    def put_back(self) -> None:
        for hooks, items in self.saved:
            ours = [(key, value) for key, value in items if key in self.own]
            others = [key for key, _ in items if key not in self.own]
            last = not others or all(key not in self.own for key, _ in items[: len(others)])
            unchanged = list(hooks) == others
            # Appended: where ours were last (the usual case) or someone changed the dict meanwhile, that is all
            hooks.update(ours)
            if last or not unchanged:
                continue
            # ours were among others': each of theirs that came after ours moves behind them, one call each on
            # torch's OrderedDicts, so none of theirs is ever missing from the dict
            first = next(n for n, (key, _) in enumerate(items) if key in self.own)
            for key in (key for key, _ in items[first:] if key not in self.own):
                if hasattr(hooks, "move_to_end"):
                    hooks.move_to_end(key)
                else:
                    hooks[key] = hooks.pop(key)


def _step_inputs(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """A forward's ``input_ids`` (keyword or first positional argument), and the tensor that gives the
    step's ``(b, s)``: those ids, else ``inputs_embeds`` (None where neither was passed)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    return input_ids, input_ids if input_ids is not None else kwargs.get("inputs_embeds")


def _find_cache(kwargs: dict) -> tuple[str | None, Any]:
    """The KV cache among a forward's keyword arguments, and the keyword that carried it.

    transformers renamed ``past_key_values`` to ``cache`` in 5.24 (the old name is deprecated until
    5.40); any other argument with ``get_seq_length()`` is a cache too, so a further rename is found.
    """
    for name in ("cache", "past_key_values"):
        value = kwargs.get(name)
        if value is not None:
            return name, value
    for name, value in kwargs.items():
        if hasattr(value, "get_seq_length"):
            return name, value
    return None, None


# A guard on something reached through a module's hook function: its closure or its code, as dynamo names the
# sources of the capture's own compiled call (``fn`` is the bound ``model.__call__`` that :func:`_own_code` closes over).
_OWN_HOOK_GUARD = re.compile(
    r"(?:L\['fn'\]|fn)\.__self__((?:\._modules\['[^']+'\])*)\.(_forward_(?:pre_)?hooks)\[.*?\]\.(?:__closure__|__code__)")
_MODULE_KEY = re.compile(r"\._modules\['([^']+)'\]")


def _top_level(recorder: Recorder, hook: Any) -> Any:
    """A top-level hook of ``recorder``: ``hook`` run eagerly, once per forward.

    - Inside the capture's own compiled call (:meth:`Recorder._compiled_call`), which runs the hooks'
      work around the compiled graph, it does nothing. Dynamo traces that check (a guard on a flag): no
      graph break; were the compiled call to fall back to eager, the flag still holds.
    - Traced by dynamo otherwise (``model.compile()``, a caller's compiled module): ``hook`` is called
      through ``torch._dynamo.disable``, a graph break.
    - Eagerly: ``hook`` itself, with no wrapper to pay.
    """
    def in_graph(*args: Any) -> None:
        out = hook(*args)
        if not recorder._paused:  # a step recorded from compiled code (not one run while paused)
            recorder._saw_compiled = True
        return out

    disabled = _eager(in_graph)

    def top_level(*args: Any) -> None:
        if recorder._in_compiled:
            return None
        if torch.compiler.is_compiling():
            return disabled(*args)
        return hook(*args)

    _run_as_python(top_level)
    return top_level


def _run_as_python(fn: Any) -> None:
    """Let dynamo never compile ``fn`` (nor what it calls) as a frame of its own; traced through, it is inlined.

    transformers' own compiled call runs ``Module.__call__`` eagerly under dynamo's frame hook: each
    top-level hook called there (the first forward of a batch that pauses the capture, or any forward
    compiled with the model's hooks outside its graph) would otherwise be compiled as its own frame and
    pay its guard check and a graph break into the disabled hook at every call. Before a paused batch
    took the hooks off (:class:`_HooksOff`), that was every paused compiled step: about 40 µs, +1.2% of a
    compiled Qwen3 batch-1 decode step on an H200. Skipped, it runs as plain Python.
    """
    try:
        from torch._dynamo.eval_frame import FrameAction, FrameExecStrategy, set_code_exec_strategy
    except ImportError:  # pragma: no cover - a torch without per-code frame strategies
        return
    set_code_exec_strategy(fn.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))


def _distinct_backend(config: Any) -> Any:
    """The backend ``torch.compile`` builds from a transformers ``CompileConfig``, as an object equal only to
    itself: dynamo does not reuse code compiled before under an equal backend."""
    conf = config.to_dict()
    backend, mode, options, dynamic = conf["backend"], conf.get("mode"), conf.get("options"), conf.get("dynamic")
    if backend == "inductor":
        inner = torch._TorchCompileInductorWrapper(mode, options, dynamic)
    else:
        inner = torch._TorchCompileWrapper(backend, mode, options, dynamic)
    return _Distinct(inner)


class _Distinct:
    """A compiler backend that delegates to ``inner`` and equals no other object."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.compiler_name = getattr(inner, "compiler_name", "capture")
        self.__name__ = self.compiler_name

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        return self.inner(gm, example_inputs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)


_ABSENT = object()


def _own_attrs(obj: Any, *names: str) -> dict[str, Any]:
    """``obj``'s own (instance) attributes ``names``, :data:`_ABSENT` where it has none, for :func:`_put_back`."""
    return {name: obj.__dict__.get(name, _ABSENT) for name in names}


def _put_back(obj: Any, saved: dict[str, Any]) -> None:
    """Give ``obj`` back the instance attributes :func:`_own_attrs` saved (removing those it did not have)."""
    for name, value in saved.items():
        if value is _ABSENT:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = value


def _own_code(fn: Any) -> Any:
    """A function calling ``fn`` with a code object and globals of its own: dynamo keeps compiled code on
    the code object it compiled and its compiled graphs in that code's globals, so what a capture
    compiles goes when its function does."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return types.FunctionType(call.__code__.replace(), {"__builtins__": builtins}, "capture_call", None, call.__closure__)


def _eager(hook: Any) -> Any:
    """``hook`` run eagerly even when the model's forward is compiled (a graph break at its call)."""
    try:
        import torch._dynamo as dynamo
    except ImportError:  # pragma: no cover
        return hook
    return dynamo.disable(hook, recursive=True)


def _token_validity(mask: Any, b: int, s: int, new_sequences: bool, device: torch.device, filled: Any) -> torch.Tensor:
    """``(b, s)``: nonzero for a real token of this step, 0 for padding, as a device tensor (no sync).

    - no mask: every token is real;
    - 2-D padding mask ``(b, past + s)`` (dynamic cache): its last ``s`` columns;
    - 4-D mask ``(b, 1, s, kv_len)`` (static cache, built by generate for compiled decoding), bool or
      additive float: a token is real iff it may attend to itself. In a prefill the i-th query sits
      at key i; in a decode step generate() feeds no padding (finished rows are handled by EOS);
    - a dict of masks per attention type (sliding-window models): its full-attention entry.

    ``filled(shape, value, device)`` gives a cached constant tensor (no launch per step).
    """
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if mask is None:
        return filled((b, s), 1, device)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return _int64(mask[:, -s:])
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        if not new_sequences:
            return filled((b, s), 1, device)
        diag = torch.diagonal(mask[:, 0, :, :s], dim1=-2, dim2=-1)
        allowed = diag if diag.dtype == torch.bool else diag == 0
        return allowed.to(torch.int64)
    raise CaptureError(
        f"capture: unsupported attention mask ({type(mask).__name__}"
        + (f" of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else "")
        + "); capture reads 2-D padding masks and 4-D masks of (static-cache) generate()"
    )


def _int64(t: torch.Tensor) -> torch.Tensor:
    """``t`` as int64 (the host side reads a step's small parts so); a launch only when it is not."""
    return t if t.dtype == torch.int64 else t.to(torch.int64)


def _eos_set(eos: Any) -> frozenset[int]:
    if eos is None:
        return frozenset()
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    if isinstance(eos, int):
        return frozenset({eos})
    return frozenset(int(e) for e in eos)


def capture(
    model: nn.Module,
    out: str | Path,
    *,
    domain: str | None = None,
    dataset: str | None = None,
    force: bool = False,
    weights: bool = True,
    eos_token_id: Any = "auto",
    buffer_rows: int = 1 << 16,
    shard_rows: int = 1 << 20,
    flush_seconds: float = 5.0,
    settings: dict[str, Any] | None = None,
) -> Recorder:
    """Prepare to record the routing of ``model`` (a transformers v5 MoE model) into trace ``out``.

    Use the result as a context manager around your own generation loop::

        with capture(model, "traces/run1", domain="code") as rec:
            model.generate(**inputs)

    On leaving the block the trace is marked ``complete: true``; an exception or Ctrl-C inside it
    leaves a valid trace marked ``complete: false`` with every forward step that finished.

    Args:
        domain, dataset: default labels of requests not labelled with ``rec.new_request``.
        force: replace an existing trace at ``out``.
        weights: also record the routing weights as applied (``(n, k)`` float32 per row).
        eos_token_id: ids that end a request (tokens fed after one are padding); ``"auto"`` takes
            ``model.generation_config.eos_token_id``; ``None`` records every fed token.
        buffer_rows: rows staged on the host before they are handed to the writer.
        shard_rows: rows per Parquet shard.
        flush_seconds: at most this long between shards while rows arrive, so a killed process
            keeps what it recorded until a few seconds before.
        settings: extra entries for the manifest's ``capture`` section (the CLI records its options).

    Raises:
        CaptureError: the model has no MoE layers, or routing that cannot be read.
        OutputExistsError: ``out`` exists and ``force`` is false.
    """
    layout = discover(model)
    if isinstance(eos_token_id, str) and eos_token_id == "auto":
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None)
    eos = sorted(_eos_set(eos_token_id))
    capture_settings: dict[str, Any] = {
        "tool": "moeprof.capture",
        "hooks": layout.hooks_description(),
        "counting": COUNTING_RULE,
        "eos_token_id": eos,
        "weights": weights,
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "python": platform.python_version(),
        "device": str(next((p.device for p in model.parameters()), "cpu")),
    }
    capture_settings.update(settings or {})
    missing = {} if weights else {"weights": "capture ran with weights=False"}
    writer = TraceWriter(
        out,
        model=layout.info,
        source="hf",
        capture=capture_settings,
        missing=missing,
        notes=list(layout.notes),
        force=force,
        shard_rows=shard_rows,
    )
    return Recorder(
        model,
        layout,
        writer,
        domain=domain,
        dataset=dataset,
        eos_token_id=eos_token_id,
        weights=weights,
        buffer_rows=buffer_rows,
        flush_seconds=flush_seconds,
    )


def _transformers_version() -> str | None:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # pragma: no cover - capture needs transformers only to load models
        return None
