"""Terminal plumbing shared by renderers: consoles and the standard progress bar."""

from __future__ import annotations

import os

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

# Width when the output is not a terminal (a CI log, a pipe) and COLUMNS does not say: rich would
# fall back to 80 columns and wrap table headers and cells ("grou…", a rules file:line cut in two).
# Tables size themselves to their content, so a wide limit only stops the wrapping.
LOG_WIDTH = 200


def _make(stderr: bool) -> Console:
    con = Console(stderr=stderr)
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con = Console(stderr=stderr, width=LOG_WIDTH)
    return con


def console() -> Console:
    global _stdout
    if _stdout is None:
        _stdout = _make(stderr=False)
    return _stdout


def err_console() -> Console:
    global _stderr
    if _stderr is None:
        _stderr = _make(stderr=True)
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
