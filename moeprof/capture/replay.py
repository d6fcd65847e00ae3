"""Send a domain-labelled workload to an OpenAI-compatible server (vLLM, SGLang, ``transformers serve``).

Each workload line (:mod:`moeprof.capture.workload`) becomes one request: a ``text`` line goes to
``/v1/completions``, a ``messages`` line to ``/v1/chat/completions`` (``endpoint="auto"``). Requests
start at most ``concurrency`` at a time, and with ``rate`` as a Poisson process of that many
requests per second (seeded), as serving benchmarks do.

How the domain reaches the trace: every request carries ``X-Request-Id: moeprof~<index>~<domain>~
<dataset>~`` (:mod:`moeprof.capture.tags`). vLLM builds its engine request id around that header, so
the moeprof vLLM plugin reads each request's domain from the id it already records. For engines
whose dumps are imported afterwards, :func:`write_domain_map` writes the ``request_id,domain`` CSV
that ``moeprof import --domains`` reads, keyed by the response ``id`` each server returned.

Only the standard library talks HTTP here (``urllib`` in a thread pool): no new dependency.
"""

from __future__ import annotations

import csv
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from moeprof.capture.tags import make_tag
from moeprof.capture.workload import Prompt
from moeprof.errors import MoeprofError, UsageError

ENDPOINTS = ("auto", "completions", "chat")


class ReplayError(MoeprofError):
    """The server cannot be reached or does not speak the OpenAI API."""


@dataclass
class ReplayOptions:
    url: str
    concurrency: int = 8
    rate: float | None = None
    """Requests per second (Poisson arrivals); ``None`` sends as fast as ``concurrency`` allows."""
    endpoint: str = "auto"
    model: str | None = None
    """Model name for the request body; ``None`` asks the server (``GET /v1/models``)."""
    max_tokens: int = 64
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields added to every request body (``{"ignore_eos": true}`` for vLLM, say)."""
    timeout: float = 600.0
    seed: int = 0


@dataclass
class RequestResult:
    index: int
    tag: str
    domain: str
    dataset: str | None
    endpoint: str
    ok: bool
    response_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    latency_s: float = 0.0
    error: str | None = None


@dataclass
class ReplayReport:
    url: str
    model: str
    results: list[RequestResult]
    seconds: float

    @property
    def failed(self) -> list[RequestResult]:
        return [r for r in self.results if not r.ok]

    def by_domain(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.domain] = out.get(r.domain, 0) + 1
        return dict(sorted(out.items()))

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens or 0 for r in self.results)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens or 0 for r in self.results)


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _call(url: str, body: dict | None, headers: dict[str, str], timeout: float) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            payload = {"error": {"message": text[:500]}}
        return exc.code, payload


def server_model(options: ReplayOptions) -> str:
    """The model name to send: ``options.model`` or the first model the server lists."""
    url = f"{_base(options.url)}/v1/models"
    try:
        status, payload = _call(url, None, {}, timeout=30)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ReplayError(f"cannot reach {url}: {reason}; is the server running (check --url)?") from None
    except json.JSONDecodeError:
        raise ReplayError(f"{url} did not answer JSON; is --url an OpenAI-compatible server?") from None
    if options.model:
        return options.model
    models = [m.get("id") for m in payload.get("data", []) if isinstance(m, dict)] if status == 200 else []
    if not models:
        raise ReplayError(f"{url} (HTTP {status}) lists no model; name one with --model")
    return str(models[0])


def _body(prompt: Prompt, endpoint: str, model: str, options: ReplayOptions) -> tuple[str, dict]:
    kind = endpoint
    if kind == "auto":
        kind = "chat" if prompt.messages is not None else "completions"
    body: dict[str, Any] = {"model": model, "max_tokens": options.max_tokens}
    if options.temperature is not None:
        body["temperature"] = options.temperature
    if kind == "chat":
        messages = (
            [{"role": r, "content": c} for r, c in prompt.messages]
            if prompt.messages is not None
            else [{"role": "user", "content": prompt.text}]
        )
        body["messages"] = messages
    else:
        body["prompt"] = prompt.render()
    body.update(options.extra)
    return kind, body


def _send(index: int, prompt: Prompt, model: str, options: ReplayOptions) -> RequestResult:
    tag = make_tag(index, prompt.domain, prompt.dataset)
    kind, body = _body(prompt, options.endpoint, model, options)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    result = RequestResult(index, tag, prompt.domain, prompt.dataset, kind, ok=False)
    t0 = time.perf_counter()
    try:
        status, payload = _call(_base(options.url) + path, body, {"X-Request-Id": tag}, options.timeout)
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        result.latency_s = time.perf_counter() - t0
        return result
    result.latency_s = time.perf_counter() - t0
    if status != 200:
        err = payload.get("error", payload)
        result.error = f"HTTP {status}: {err.get('message', err) if isinstance(err, dict) else err}"
        return result
    usage = payload.get("usage") or {}
    choices = payload.get("choices") or [{}]
    result.ok = True
    result.response_id = payload.get("id")
    result.prompt_tokens = usage.get("prompt_tokens")
    result.completion_tokens = usage.get("completion_tokens")
    result.finish_reason = choices[0].get("finish_reason")
    return result


def arrival_times(n: int, rate: float | None, seed: int = 0) -> np.ndarray:
    """Start offsets in seconds of ``n`` requests: all at 0, or a Poisson process of ``rate``/s."""
    if rate is None:
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def replay(
    prompts: Sequence[Prompt],
    options: ReplayOptions,
    progress: Callable[[RequestResult], None] | None = None,
) -> ReplayReport:
    """Send every prompt; return each request's outcome in workload order."""
    if options.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {options.concurrency}")
    if options.rate is not None and options.rate <= 0:
        raise UsageError(f"--rate must be positive (requests per second), got {options.rate}")
    if options.endpoint not in ENDPOINTS:
        raise UsageError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {options.endpoint!r}")
    model = server_model(options)
    starts = arrival_times(len(prompts), options.rate, options.seed)
    results: list[RequestResult | None] = [None] * len(prompts)
    lock = threading.Lock()
    t0 = time.perf_counter()

    def job(i: int) -> None:
        res = _send(i, prompts[i], model, options)
        with lock:
            results[i] = res
            if progress is not None:
                progress(res)

    with ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="moeprof-replay") as pool:
        for i, start in enumerate(starts):
            delay = t0 + float(start) - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(job, i)
    return ReplayReport(options.url, model, [r for r in results if r is not None], time.perf_counter() - t0)


def write_log(report: ReplayReport, path: str | Path) -> Path:
    """One JSON line per request: its tag, domain, the server's response id, token counts, latency, error."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in report.results:
            fh.write(json.dumps(asdict(r)) + "\n")
    tmp.replace(path)
    return path


def write_domain_map(report: ReplayReport, path: str | Path) -> Path:
    """The ``request_id,domain`` CSV of ``moeprof import --domains`` (response ids of answered requests)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["request_id", "domain"])
        for r in report.results:
            if r.ok and r.response_id:
                w.writerow([r.response_id, r.domain])
    tmp.replace(path)
    return path
