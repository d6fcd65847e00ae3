"""Where moeprof writes: its own marker, ``--force`` that replaces only moeprof's files, whole-or-nothing writes.

Every output directory moeprof writes carries a small JSON file :data:`MARKER` (``.moeprof``)::

    {"moeprof": "0.1.0", "kind": "analysis", "files": ["summary.json", "plots/load.png", ...]}

``files`` lists, relative to the directory, every file moeprof put there (a file output such as
``place --out DIR/placement.json`` is added to the ledger of ``DIR``). A trace that grows while a
capture runs has no list: its files are those of the trace layout (:data:`LAYOUTS`).

``--force`` replaces a path only when everything in it is moeprof's: the marker is there and every
file under it is listed, or matches its layout, or sits in a nested directory that passes the same
test (``demo``'s trace, analysis, report...). Anything else is refused, naming the first file that is
not moeprof's. Nothing is ever deleted to make room for an output that then fails.

Directory outputs are written into a hidden sibling (same file system), which replaces the target by
rename once everything is written (:func:`staged_dir`); on failure the sibling is removed and the
target is as it was. A sibling left by a killed process is removed by the next write to the target.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from moeprof.errors import OutputError, OutputExistsError

MARKER = ".moeprof"
STAGING = ".moeprof-partial-"
"""Infix of the hidden sibling an output is written into: ``.NAME.moeprof-partial-PID-XXXX``."""

LAYOUTS: dict[str, tuple[str, ...]] = {
    # A trace in progress: the shards, the manifest, and the temporary names they are written under.
    # Live engine captures (the vLLM plugin) add one trace per rank under ranks/ and a merge lock.
    "trace": ("manifest.json", "requests.parquet", "routing/part-*.parquet", "loads/part-*.parquet",
              ".*.tmp*", "routing/.*.tmp*", "loads/.*.tmp*", "ranks/*", ".moeprof-merge.lock",
              "requests-*.parquet", ".requests.pending.parquet"),
}


# -- the marker ----------------------------------------------------------------------------------
def read_marker(directory: str | Path) -> dict | None:
    """The marker of ``directory`` as a dict, or ``None`` if it has none (or one moeprof did not write)."""
    path = Path(directory) / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "moeprof" not in data or not isinstance(data.get("kind"), str):
        return None
    return data


def write_marker(directory: str | Path, kind: str, files: list[str] | None = None) -> None:
    """Write (atomically) the marker of ``directory``: ``kind`` and the files moeprof wrote there."""
    from moeprof import __version__
    from moeprof.trace.manifest import write_json_atomic

    data: dict = {"moeprof": __version__, "kind": kind}
    if files is not None:
        data["files"] = sorted(set(files))
    write_json_atomic(Path(directory) / MARKER, data)


def list_files(directory: Path) -> list[str]:
    """Every file under ``directory`` (relative, ``/``-separated), the marker excepted."""
    directory = Path(directory)
    found = []
    for root, _dirs, names in os.walk(directory):
        for name in names:
            rel = (Path(root) / name).relative_to(directory).as_posix()
            if rel != MARKER:
                found.append(rel)
    return sorted(found)


def record_files(directory: str | Path, names: list[str], kind: str = "files") -> None:
    """Add ``names`` (relative to ``directory``) to its marker, creating one if it has none."""
    marker = read_marker(directory)
    if marker is None:
        write_marker(directory, kind, list(names))
    elif "files" in marker:
        write_marker(directory, marker["kind"], list(marker["files"]) + list(names))
    # A marker without a file list (a trace in progress) is described by its layout; nothing to add.


def foreign_file(directory: str | Path) -> Path | None:
    """The first file under ``directory`` that moeprof did not write, or ``None`` if all of it is moeprof's."""
    directory = Path(directory)
    marker = read_marker(directory)
    if marker is None:
        for entry in sorted(directory.iterdir()):
            return entry
        return None
    listed = set(marker.get("files") or ())
    patterns = LAYOUTS.get(marker["kind"], ()) if "files" not in marker else ()
    for root, dirs, names in os.walk(directory):
        here = Path(root)
        for d in sorted(dirs):
            sub = here / d
            rel = sub.relative_to(directory).as_posix()
            if (sub / MARKER).exists() and not any(f.startswith(rel + "/") for f in listed):
                bad = foreign_file(sub)
                if bad is not None:
                    return bad
                dirs.remove(d)  # a nested moeprof output, checked on its own terms
        for name in sorted(names):
            rel = (here / name).relative_to(directory).as_posix()
            if name == MARKER or rel in listed or any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                continue
            return here / name
    return None


# -- checks before work --------------------------------------------------------------------------
# s3://b/x, or what pathlib makes of it (s3:/b/x): outputs go to local or mounted directories only.
_URI_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # two letters at least: C:/ is a drive


def refuse_uri(out: str | Path, option: str = "--out") -> None:
    """Raise :class:`OutputError` if ``out`` names object storage: moeprof reads traces there but
    writes its outputs to a local (or mounted) directory."""
    if _URI_LIKE.match(str(out)):
        shown = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)", r"\1://", str(out))  # as typed, before pathlib
        raise OutputError(
            f"{option} {shown}: moeprof reads traces on object storage but writes its outputs to a local (or "
            f"mounted) directory; give a local {option} and copy the result to the bucket afterwards"
        )


def refuse_overwriting_input(out: str | Path, path: str | Path, what: str, *, option: str = "--out") -> None:
    """Raise :class:`OutputError` if the input ``path`` is ``out`` or lies inside it: replacing ``out``
    (``--force``: it may well be moeprof's, a trace is) would delete what the command reads.
    ``what`` names the input in the message, e.g. "the trace being read (T)"."""
    if _URI_LIKE.match(str(path)) or _URI_LIKE.match(str(out)):
        return
    target, inside = Path(out).resolve(), Path(path).resolve()
    if inside == target or target in inside.parents:
        raise OutputError(f"{option} {out}: holds {what}; writing there would replace it: choose another {option}")


def check_target(out: str | Path, force: bool, *, option: str = "--out", whole: bool = True) -> None:
    """Raise now (before any expensive work) if writing a directory output at ``out`` cannot succeed.

    Refuses: ``out`` is a file; ``out`` holds something and ``force`` is false; ``force`` is given but
    something under ``out`` is not moeprof's; the parent cannot be written (read-only, no permission);
    ``out`` is the current directory or holds it, when ``whole`` (the output replaces ``out`` as a whole).
    """
    refuse_uri(out, option)
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputExistsError(f"{option} {out}: exists and is not a directory; choose another {option}")
        here = Path.cwd().resolve()
        if whole and (out.resolve() == here or out.resolve() in here.parents):
            # Replacing it would pull the directory out from under the shell (and `.` cannot be renamed).
            raise OutputExistsError(
                f"{option} {out}: is the current directory{'' if out.resolve() == here else ' or holds it'}; "
                f"moeprof writes {option} as a directory of its own and replaces it whole: give a new one, "
                f"such as {option} {Path(out, 'moeprof-out') if out.resolve() != here else 'moeprof-out'}"
            )
        if any(out.iterdir()):
            if not force:
                raise OutputExistsError(f"{out} already exists; pass --force to replace it")
            bad = foreign_file(out)
            if bad is not None:
                raise OutputExistsError(
                    f"{bad}: not written by moeprof ({out} has no {MARKER} marker listing it); refusing to "
                    f"delete {out} even with --force: choose another {option} or remove it yourself"
                )
    check_writable(out.parent if str(out.parent) else Path("."), option=option, target=out)


def check_writable(directory: Path, *, option: str = "--out", target: Path | None = None) -> None:
    """Raise :class:`OutputError` unless a file can be created in ``directory`` (or its nearest existing parent)."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    what = target if target is not None else directory
    if not probe.is_dir():
        raise OutputError(f"{option} {what}: {probe} is not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".moeprof-probe-", dir=probe)
    except OSError as exc:
        raise OutputError(f"{option} {what}: cannot write in {probe} ({_reason(exc)})") from None
    os.close(fd)
    os.unlink(name)


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return f"{exc.strerror}: the disk is full or a file size limit was reached"
    return exc.strerror or str(exc)


# -- whole-or-nothing writes ---------------------------------------------------------------------
def _clear_stale(out: Path) -> None:
    """Remove hidden siblings of ``out`` that a killed moeprof left (its process is gone)."""
    for sibling in out.parent.glob(f".{out.name}{STAGING}*"):
        try:
            pid = int(sibling.name[len(f".{out.name}{STAGING}"):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid) and _ours(sibling):
            shutil.rmtree(sibling, ignore_errors=True)


def _ours(staging: Path) -> bool:
    """A staging directory moeprof made: marked, or killed before its marker was in place."""
    if read_marker(staging) is not None:
        return True
    try:
        return all(p.name.startswith(f".{MARKER}") or p.name == MARKER for p in staging.iterdir())
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def begin_staged(out: str | Path, kind: str, force: bool) -> Path:
    """Check ``out``, then create and return the hidden sibling to write it in (marked ``kind``)."""
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING}{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({_reason(exc)})") from None
    try:
        write_marker(tmp, kind)
    except BaseException as exc:  # Ctrl-C or SIGTERM too: the caller's cleanup does not know tmp yet
        discard_staged(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"{out}: cannot write ({_reason(exc)})") from None
        raise
    return tmp


def commit_staged(tmp: Path, out: str | Path, *, files: bool = True) -> None:
    """Replace ``out`` by the finished ``tmp`` (listing its files in the marker when ``files``)."""
    out = Path(out)
    marker = read_marker(tmp) or {"kind": "output"}
    if files:
        write_marker(tmp, marker["kind"], list_files(tmp))
    old = None
    if out.exists():
        # The target was checked at the start; check again, something may have appeared since.
        if any(out.iterdir()) and foreign_file(out) is not None:
            raise OutputExistsError(f"{foreign_file(out)}: appeared while moeprof was writing {out}; left as it is")
        old = out.with_name(f".{out.name}{STAGING}{os.getpid()}-old")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:  # Ctrl-C, SIGTERM or an OS error between the two renames: the previous output stays
        if old is not None and not out.exists():
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard_staged(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_dir(out: str | Path, kind: str, force: bool = False) -> Iterator[Path]:
    """Write a directory output whole or not at all::

        with staged_dir(out, "analysis", force) as tmp:
            write everything into tmp

    On success ``tmp`` replaces ``out``; on any error ``tmp`` is removed, ``out`` is untouched, and
    an ``OSError`` (disk full, permission) becomes an :class:`OutputError` naming ``out``.
    """
    tmp = begin_staged(out, kind, force)
    try:
        yield tmp
        commit_staged(tmp, out)
    except OSError as exc:
        discard_staged(tmp)
        raise OutputError(f"{out}: writing failed ({_reason(exc)}); nothing was written") from exc
    except BaseException:
        discard_staged(tmp)
        raise


def begin_in_place(out: str | Path, kind: str, force: bool, *, lock: bool = False) -> None:
    """Prepare ``out`` for an output written where it stands (a capture): check it, remove an earlier
    moeprof output there (only with ``force``, only if all of it is moeprof's), create it, mark it.
    With ``lock``, ``out`` stays locked (:func:`lock_output`) until :func:`release_output` or this
    process ends."""
    out = Path(out)
    check_target(out, force)
    try:
        if out.exists() and any(out.iterdir()):
            if lock:
                lock_output(out)  # not while another process writes it
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if lock:
            lock_output(out)
        write_marker(out, kind)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({_reason(exc)})") from None


# Directories this process writes in place, by (device, inode): the open descriptor holding its lock.
_LOCKS: dict[tuple[int, int], int] = {}


def lock_output(out: Path) -> None:
    """Take an exclusive lock on the directory ``out`` for this process, or raise
    :class:`OutputExistsError` if another process holds it: two captures started into one ``--out``
    each checked it empty, wrote into it together and both reported success, with one's trace lost."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no lock, as before
        return
    st = out.stat()
    if (st.st_dev, st.st_ino) in _LOCKS:
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputExistsError(
            f"{out}: another moeprof process is writing it now; wait for it to finish or choose another --out"
        ) from None
    _LOCKS[(st.st_dev, st.st_ino)] = fd


def release_output(out: str | Path) -> None:
    """Release the lock :func:`lock_output` took on ``out`` (nothing if none)."""
    try:
        st = Path(out).stat()
    except OSError:
        return
    fd = _LOCKS.pop((st.st_dev, st.st_ino), None)
    if fd is not None:
        os.close(fd)


def begin_demo(out: str | Path, force: bool) -> None:
    """``moeprof demo``: ``out`` holds one moeprof output per step (each replaced by its own step);
    check it as a whole now (with ``force``, nothing in it may be the user's) and mark it."""
    out = Path(out)
    check_target(out, force, whole=False)  # each step replaces its own subdirectory, never ``out``
    kind = (read_marker(out) or {}).get("kind") if out.is_dir() else None
    if kind not in (None, "demo"):  # a trace or an analysis: the steps' folders would be written inside it
        raise OutputExistsError(f"--out {out}: holds a moeprof {kind}, not a demo; the demo writes its steps' "
                                "folders in a directory of its own: choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if read_marker(out) is None:
            write_marker(out, "demo", [])
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write ({_reason(exc)})") from None


# -- files written into a directory that may hold other things -----------------------------------
def check_entries(directory: str | Path, names: list[str], force: bool, *, option: str = "--out",
                  shown: Path | None = None) -> None:
    """Refuse (before any work) to write the entries ``names`` (files or directories) into ``directory``
    unless each is new, or ``force`` is given and it is moeprof's (listed in the marker, or a nested
    moeprof output). Other things in ``directory`` are never touched. ``shown``: what the user gave
    ``option`` (a file in ``directory``), for the messages; by default ``directory``."""
    refuse_uri(directory, option)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        if shown is not None:
            raise OutputExistsError(f"{option} {shown}: {directory} is not a directory")
        raise OutputExistsError(f"{option} {directory}: exists and is not a directory; choose another {option}")
    marker = read_marker(directory) if directory.is_dir() else None
    listed = set((marker or {}).get("files") or ())
    for name in names:
        target = directory / name
        if not (target.exists() or target.is_symlink()):
            continue
        if not force:
            raise OutputExistsError(f"{target}: exists; pass --force to replace it")
        if target.is_dir() and not target.is_symlink():
            inside = [f"{name}/{f}" for f in list_files(target)]
            if all(f in listed for f in inside):
                continue
            bad = foreign_file(target)
        else:
            bad = None if name in listed else target
        if bad is not None:
            raise OutputExistsError(
                f"{bad}: not written by moeprof (not listed in {directory / MARKER}); refusing to replace "
                f"{target} even with --force: choose another {option} or remove it yourself"
            )
    check_writable(directory, option=option, target=shown or directory)


@contextmanager
def staged_files(directory: str | Path, names: list[str], force: bool = False, *, kind: str = "files",
                 option: str = "--out") -> Iterator[Path]:
    """Write the entries ``names`` into ``directory`` whole or not at all::

        with staged_files(out, ["index.html", "summary.md"], force) as tmp:
            write tmp / "index.html", tmp / "summary.md"

    Everything is written in a hidden directory first; once all is written each entry replaces its
    namesake by rename and is listed in ``directory``'s marker. On failure nothing of it is left.
    """
    directory = Path(directory)
    check_entries(directory, names, force, option=option)
    created = not directory.exists()
    tmp = None

    def discard() -> None:  # on any exception, Ctrl-C and SIGTERM too: nothing of this output may be left
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(directory, ignore_errors=True)

    try:
        directory.mkdir(parents=True, exist_ok=True)
        _clear_stale(directory / "files")
        tmp = Path(tempfile.mkdtemp(prefix=f".files{STAGING}{os.getpid()}-", dir=directory))
        write_marker(tmp, kind)
    except BaseException as exc:
        discard()
        if isinstance(exc, OSError):
            raise OutputError(f"{option} {directory}: cannot write ({_reason(exc)})") from None
        raise
    try:
        yield tmp
        written = []
        for name in names:
            src, dst = tmp / name, directory / name
            if not src.exists():
                continue
            written += [f"{name}/{f}" for f in list_files(src)] if src.is_dir() else [name]
            if dst.is_dir() and not dst.is_symlink():
                old = directory / f".{name}{STAGING}{os.getpid()}-old"
                os.rename(dst, old)
                os.rename(src, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(src, dst)
        record_files(directory, written, kind)
    except BaseException as exc:
        discard()
        if isinstance(exc, OSError):
            raise OutputError(f"{directory}: writing failed ({_reason(exc)}); nothing was written") from exc
        raise
    shutil.rmtree(tmp, ignore_errors=True)
