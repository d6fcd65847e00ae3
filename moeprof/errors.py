"""Errors a user can act on.

Every failure caused by input (a file, an option, a trace) raises a subclass of
:class:`MoeprofError` whose message names the thing at fault and what to do.
The CLI's single entry point (``moeprof.commands.main``) prints the message on
stderr and exits with :attr:`MoeprofError.exit_code`; library users catch them.
"""

from __future__ import annotations


class MoeprofError(Exception):
    """Base of every error moeprof raises on purpose."""

    exit_code = 2


class UsageError(MoeprofError):
    """An option or argument that cannot be honoured."""


class OutputExistsError(MoeprofError):
    """An output path exists and ``force`` was not given."""


class OutputError(MoeprofError):
    """An output that cannot be written (read-only, no permission, disk full); nothing was left behind."""


class TraceError(MoeprofError):
    """A trace directory that cannot be read."""


class TraceVersionError(TraceError):
    """A trace written in a format version this moeprof cannot read."""


class TraceIntegrityError(TraceError):
    """A shard whose checksum, size or row count disagrees with the manifest."""


class WorkloadError(MoeprofError):
    """A prompts / workload file with a bad line."""


class CaptureError(MoeprofError):
    """A model that cannot be captured (no MoE layers, unsupported layout)."""


class CaptureInterrupted(MoeprofError):
    """A capture stopped by Ctrl-C (exit 130) or SIGTERM (143): the message says what was kept and where."""

    exit_code = 130


class Terminated(BaseException):
    """SIGTERM (``kill PID``, a CI job's timeout, ``docker stop``), raised in the main thread by the
    command line's handler so that what is being written is removed (or, for a capture, kept and
    marked incomplete) on the way out, as for Ctrl-C. A ``BaseException``, so that no
    ``except Exception`` takes it for an error of the work."""


class ImportFormatError(MoeprofError):
    """An engine dump that does not have the structure its format requires."""


class AnalysisError(MoeprofError):
    """A statistic asked of a trace that cannot provide it."""


class PlacementError(MoeprofError):
    """A topology or placement that cannot be built or read."""
