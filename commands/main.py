"""The `moeprof` command: one typer app, one place that turns errors into messages and exit codes."""

from __future__ import annotations

import functools
import sys
from typing import Any

import typer
from rich.text import Text

from moeprof import __version__
from moeprof.errors import MoeprofError, Terminated  # Terminated: SIGTERM, raised by _terminate
from moeprof.report.console import err_console

app = typer.Typer(
    name="moeprof",
    help=(
        "Profile how a Mixture-of-Experts model routes tokens to experts on your workload, "
        "and turn it into expert placement and request grouping.\n\n"
        "Start with `moeprof demo`, which runs every step on the shipped tiny model."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moeprof {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    pass


# Subcommand name -> module in moeprof.commands; each module exposes one function of the same name
# (``import`` is a keyword, so its module and function are ``import_``). The order is the help's order.
COMMANDS = {
    "demo": "demo",
    "capture": "capture",
    "replay": "replay",
    "import": "import_",
    "inspect": "inspect",
    "analyze": "analyze",
    "place": "place",
    "simulate": "simulate",
    "report": "report",
    "check": "check",
    "diff": "diff",
    "merge": "merge",
}


def _register() -> None:
    import importlib
    import importlib.util

    for name, module_name in COMMANDS.items():
        qualified = f"moeprof.commands.{module_name}"
        if importlib.util.find_spec(qualified) is None:
            continue
        module = importlib.import_module(qualified)
        fn = getattr(module, module_name)
        app.command(name, help=reflow(fn.__doc__ or ""))(fn)


def reflow(doc: str) -> str:
    """A docstring as help text that wraps to any terminal: the lines of a prose paragraph (and of
    each ``- `` item) joined into one, indented lines (examples) kept as they are.

    typer keeps a docstring's single line breaks, so text wrapped at 100 columns in the source came
    out broken twice in an 80-column terminal.
    """
    import inspect

    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.split("\n")
        if all(line.startswith((" ", "\t")) for line in lines):
            out.append(para)  # an indented block (examples): kept line by line
            continue
        items: list[str] = []
        for line in lines:
            text = line.strip()
            indented = line.startswith((" ", "\t"))
            if indented and not (items and items[-1].startswith("- ")):
                items.append(line)  # an example line inside a paragraph: its own line
            elif not items or text.startswith("- ") or items[-1].startswith((" ", "\t")):
                items.append(text)
            else:
                items[-1] += " " + text  # a wrapped line of prose or of the item before
        out.append("\n".join(items))
    return "\n\n".join(out)


_register()


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(Exit, ClickException, Abort) classes of whichever click typer runs on.

    typer >= 0.20 vendors its own copy of click (``typer._click``) and does not install click;
    older releases use the click package.
    """
    exits: set[type] = {typer.Exit}
    errors: set[type] = set()
    aborts: set[type] = {typer.Abort}
    try:
        from typer._click import exceptions as vendored

        errors.add(vendored.ClickException)
    except ImportError:
        pass
    try:
        import click

        exits.add(click.exceptions.Exit)
        errors.add(click.ClickException)
        aborts.add(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(exits), tuple(errors), tuple(aborts)


_EXIT, _CLICK_ERROR, _ABORT = _click_exception_types()


TERM_GRACE_S = 10.0
"""Seconds a terminated command has to remove what it was writing before it exits regardless."""


def _terminate(_signum: int, _frame: object) -> None:
    import os
    import signal
    import threading
    import time

    # Raised at any point of the work, the exception could leave a lock held and the cleanup waiting on
    # it: a second SIGTERM ends the process at once, and so does this deadline.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def deadline() -> None:
        time.sleep(TERM_GRACE_S)
        os._exit(143)

    threading.Thread(target=deadline, name="moeprof-term-deadline", daemon=True).start()
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (console_scripts passes it to sys.exit)."""
    import signal
    import threading

    previous, previous_int = None, None
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _terminate)
        current = signal.getsignal(signal.SIGINT)
        if callable(current):  # Python's handler, or a program's around main(): counted, then called
            previous_int = signal.signal(signal.SIGINT, functools.partial(_interrupt, current))
    hook = sys.unraisablehook
    if previous_int is not None:
        sys.unraisablehook = functools.partial(_redeliver_interrupt, hook)
    try:
        code = _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
            sys.unraisablehook = hook
    if code == 130:
        # A Ctrl-C that lands in code run from a string (exec/eval: a dataclass's generated __init__, a
        # namedtuple being defined) makes CPython mark the interrupt unhandled, even once it is caught here;
        # `python -m moeprof` then ends the process by SIGINT, not with this code (in about 1 run of 100
        # here). Running a string that raises nothing clears the mark.
        exec("")
    return code


_ABORTS_SAID = [0]  # how often "Aborted." was printed in this process (demo runs commands through main too)
_SIGINTS = [0]  # how many Ctrl-Cs this process received while a command ran


def _interrupt(handler: Any, signum: int, frame: object) -> None:
    """The Ctrl-C handler that was there (Python's: a KeyboardInterrupt), counted: a library may turn the
    interrupt into another error (polars: a TypeError, the KeyboardInterrupt swallowed while it converted a
    dtype; a Rust panic, pyo3's PanicException, when it landed in numpy's import of its C API for
    ``Series.to_numpy``)."""
    _SIGINTS[0] += 1
    handler(signum, frame)


def _aborted() -> int:
    err_console().print(Text("Aborted.", style="yellow"))
    _ABORTS_SAID[0] += 1
    return 130


def _redeliver_interrupt(hook: Any, unraisable: Any) -> None:
    """``sys.unraisablehook`` while a command runs: a Ctrl-C raised where Python cannot raise it (a weakref
    callback such as an import lock's, a ``__del__``) was printed as "Exception ignored" and lost, the
    command running on to its end. It is sent again to the main thread, as a signal (which also wakes a
    wait there), from another thread a moment later: sent from here, it would land in this hook."""
    import signal
    import threading

    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        main = threading.main_thread().ident
        again = threading.Timer(0.05, signal.pthread_kill, (main, signal.SIGINT))
        again.daemon = True
        again.start()
        return
    hook(unraisable)


def _main(argv: list[str] | None) -> int:
    said, sigints = _ABORTS_SAID[0], _SIGINTS[0]
    try:
        # inside the try: a Ctrl-C while typer builds the commands (20 ms or more) says Aborted., not a traceback
        command = typer.main.get_command(app)
        result = command.main(args=argv, prog_name="moeprof", standalone_mode=False)
    except MoeprofError as exc:
        err_console().print(Text(f"Error: {exc}", style="red"), soft_wrap=True)
        return exc.exit_code
    except _EXIT as exc:
        return exc.exit_code
    except _CLICK_ERROR as exc:
        exc.show()
        return exc.exit_code
    except OSError as exc:
        # A user's path the checks did not foresee (permission, disk full): a message, never a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        err_console().print(Text(f"Error: {where}{exc.strerror or exc}", style="red"), soft_wrap=True)
        return 2
    except MemoryError as exc:
        # numpy says how much it could not allocate; the options that bound it are the user's to lower.
        err_console().print(Text(
            f"Error: out of memory ({exc or 'no detail'}); ask for less at once (place and simulate: "
            "--sample-requests, --sample-rows or a smaller cluster; analyze: --sample-tokens) or use a machine "
            "with more memory", style="red"), soft_wrap=True)
        return 2
    except (*_ABORT, KeyboardInterrupt):
        return _aborted()
    except Terminated:
        err_console().print(Text("Terminated.", style="yellow"))
        return 143
    except BaseException as exc:  # pyo3's PanicException is a BaseException
        if _SIGINTS[0] == sigints or isinstance(exc, (SystemExit, GeneratorExit)):
            raise  # a bug: its traceback
        return _aborted()  # the interrupt, as another error from the library it landed in
    if result == 130 and _ABORTS_SAID[0] == said:
        # typer >= 0.20 turns Ctrl-C into Exit(130), which it returns outside standalone mode: no command
        # of moeprof returns or exits with 130 otherwise, and the user would see nothing (unless a step
        # of the demo, run through main, said it already).
        _aborted()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
