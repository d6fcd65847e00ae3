"""Terminal plumbing shared by renderers: consoles and the standard progress bar."""

from __future__ import annotations

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


def progress_bar(*, transient: bool = False, disable: bool = False) -> Progress:
    """The one progress bar style of moeprof, drawn on stderr so stdout stays parseable."""
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
