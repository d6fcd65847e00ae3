"""Terminal plumbing shared by renderers: consoles and the standard progress bar."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_stdout: Console | None = None
_stderr: Console | None = None


def console() -> Console:
    global _stdout
    if _stdout is None:
        _stdout = Console()
    return _stdout


def err_console() -> Console:
    global _stderr
    if _stderr is None:
        _stderr = Console(stderr=True)
    return _stderr


def reset_consoles() -> None:
    """Forget cached consoles (tests swap sys.stdout / sys.stderr between runs)."""
    global _stdout, _stderr
    _stdout = _stderr = None


def progress_bar(*, transient: bool = False, disable: bool = False, every: float = 5.0) -> Progress:
    """The one progress bar style of moeprof, drawn on stderr so stdout stays parseable.

    When stderr is not a terminal (a CI log, a file), a bar would show nothing until the end; a plain
    line is printed instead at most every ``every`` seconds, and once when the work ends.
    """
    if not disable and not err_console().is_terminal:
        return LogProgress(err_console(), every=every)  # type: ignore[return-value]
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console(),
        transient=transient,
        disable=disable,
    )


class LogProgress:
    """The subset of :class:`rich.progress.Progress` that moeprof uses, as plain lines for logs.

    ``description`` carries the detail (tokens/s, rows, ...); a line reads
    ``capturing: 40/400 (10%), 12 s elapsed, 1,204 tokens/s, 52,160 rows``.
    """

    def __init__(self, console: Console, every: float = 5.0) -> None:
        self._console = console
        self._every = every
        self._tasks: dict[int, dict[str, Any]] = {}
        self._started = time.monotonic()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            return  # the error says what happened; a last progress line would only bury it
        for task_id, task in self._tasks.items():
            if task["completed"] and task["printed"] != (task["completed"], task["description"]):
                self._print(task_id)

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = {
            "description": description,
            "total": total,
            "completed": 0,
            "last": time.monotonic(),
            "printed": None,
        }
        return task_id

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        total: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        **_: Any,
    ) -> None:
        task = self._tasks[task_id]
        if total is not None:
            task["total"] = total
        if completed is not None:
            task["completed"] = completed
        if advance is not None:
            task["completed"] += advance
        if description is not None:
            task["description"] = description
        now = time.monotonic()
        done = task["total"] is not None and task["completed"] >= task["total"]
        if now - task["last"] >= self._every or done:
            self._print(task_id)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _print(self, task_id: int) -> None:
        task = self._tasks[task_id]
        task["last"] = time.monotonic()
        task["printed"] = (task["completed"], task["description"])
        done, total = task["completed"], task["total"]
        amount = f"{done:,.0f}/{total:,.0f} ({100 * done / total:.0f}%)" if total else f"{done:,.0f}"
        elapsed = time.monotonic() - self._started
        self._console.print(f"{task['description']}: {amount}, {elapsed:.0f} s elapsed", soft_wrap=True, highlight=False)
