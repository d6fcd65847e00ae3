"""`moeprof replay`: send a domain-labelled workload to an OpenAI-compatible server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from moeprof.report.console import console, err_console, progress_bar


def replay(
    workload: Annotated[Path, typer.Argument(help="Workload JSONL (the format of `capture --prompts`).", show_default=False)],
    url: Annotated[str, typer.Option("--url", help="Server base URL.")] = "http://127.0.0.1:8000",
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Requests in flight at most.")] = 8,
    rate: Annotated[
        Optional[float],
        typer.Option("--rate", help="Requests per second (Poisson arrivals). Default: as fast as --concurrency allows.",
                     show_default=False),
    ] = None,
    endpoint: Annotated[
        str, typer.Option("--endpoint", help="auto (text -> /v1/completions, messages -> /v1/chat/completions), completions or chat.")
    ] = "auto",
    model: Annotated[
        Optional[str], typer.Option("--model", "-m", help="Model name to send. Default: the server's first model.",
                                    show_default=False)
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Tokens to generate per request.")] = 64,
    temperature: Annotated[
        Optional[float], typer.Option("--temperature", help="Sampling temperature. Default: the server's.", show_default=False)
    ] = None,
    extra: Annotated[
        Optional[str],
        typer.Option("--extra", help="JSON object merged into every request body, e.g. '{\"ignore_eos\": true}'.",
                     show_default=False),
    ] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Send only the first N requests.", show_default=False)] = None,
    log: Annotated[
        Optional[Path], typer.Option("--log", help="Write one JSON line per request (tag, domain, response id, tokens, latency).",
                                     show_default=False)
    ] = None,
    domains: Annotated[
        Optional[Path],
        typer.Option("--domains", help="Write the request_id,domain CSV that `moeprof import --domains` reads.",
                     show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --rate arrival times.")] = 0,
) -> int:
    """Send a workload to a running vLLM / SGLang / `transformers serve` server, labelled by domain.

    Every request carries `X-Request-Id: moeprof~<n>~<domain>~<dataset>~`; the moeprof vLLM plugin
    (MOEPROF_TRACE=DIR vllm serve ...) reads each request's domain from it. For engine dumps
    imported later, --domains writes the map `moeprof import --domains` takes.

    Example:

        MOEPROF_TRACE=traces/live vllm serve ./my-moe &
        moeprof replay prompts.jsonl --url http://127.0.0.1:8000 --concurrency 16 --rate 4
    """
    from moeprof.capture.replay import ReplayOptions, replay as run_replay, write_domain_map, write_log
    from moeprof.capture.workload import read_workload
    from moeprof.errors import UsageError

    body_extra = {}
    if extra:
        try:
            body_extra = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--extra: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(body_extra, dict):
            raise UsageError("--extra must be a JSON object, e.g. '{\"ignore_eos\": true}'")
    prompts = read_workload(workload, limit=limit)
    options = ReplayOptions(
        url=url, concurrency=concurrency, rate=rate, endpoint=endpoint, model=model, max_tokens=max_tokens,
        temperature=temperature, extra=body_extra, seed=seed,
    )
    with progress_bar(transient=True) as bar:
        task = bar.add_task("replaying", total=len(prompts))
        report = run_replay(prompts, options, progress=lambda r: bar.advance(task))
    if log is not None:
        write_log(report, log)
    if domains is not None:
        write_domain_map(report, domains)

    con = console()
    ok = len(report.results) - len(report.failed)
    con.print(f"[bold]replayed[/] {len(prompts)} requests to {report.url} ({report.model})")
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="dim")
    t.add_column()
    t.add_row("answered", f"{ok} of {len(report.results)}")
    t.add_row("domains", ", ".join(f"{d} {n}" for d, n in report.by_domain().items()))
    t.add_row("tokens", f"prompt {report.prompt_tokens:,}, completion {report.completion_tokens:,}")
    rate_txt = f"{report.completion_tokens / report.seconds:,.1f} completion tokens/s" if report.seconds else ""
    t.add_row("time", f"{report.seconds:.1f} s ({rate_txt})")
    if log is not None:
        t.add_row("log", str(log))
    if domains is not None:
        t.add_row("domain map", str(domains))
    con.print(t)
    for r in report.failed[:5]:
        err_console().print(f"[yellow]request {r.index} ({r.domain}) failed:[/] {r.error}", soft_wrap=True)
    if report.failed:
        err_console().print(f"[yellow]{len(report.failed)} of {len(report.results)} requests failed[/]")
        return 1
    return 0
