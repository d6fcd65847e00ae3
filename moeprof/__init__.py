"""moeprof: measure how a Mixture-of-Experts model routes tokens on a workload, and act on it.

The library never prints and never exits; it raises :class:`moeprof.errors.MoeprofError`
subclasses. Capture needs the ``capture`` extra (torch, transformers); everything else does not.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from moeprof.errors import MoeprofError

try:
    __version__ = version("moeprof")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"

__all__ = ["MoeprofError", "__version__", "capture", "open_trace"]


def capture(model, out, **kwargs):
    """Record the routing of ``model`` into the trace directory ``out``.

    Use it as a context manager around your own generation loop::

        with moeprof.capture(model, "traces/run1", domain="code") as rec:
            model.generate(**inputs)

    See :func:`moeprof.capture.session.capture` for every option.
    """
    from moeprof.capture.session import capture as _capture

    return _capture(model, out, **kwargs)


def open_trace(path, **kwargs):
    """Open and validate a trace directory; see :class:`moeprof.trace.reader.Trace`."""
    from moeprof.trace.reader import Trace

    return Trace.open(path, **kwargs)
