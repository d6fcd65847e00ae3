"""Capture routing from running models (``session``, ``hooks``, ``workload``, ``run``); files that
engines wrote are read by the sibling package :mod:`moeprof.importers`. Importing this package needs
no torch; its modules that hook models do.
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    """``moeprof.capture(model, out, ...)`` keeps working after ``import moeprof.capture.<sub>``.

    Importing a submodule binds the attribute ``moeprof.capture`` to this package, replacing the
    function of the same name that ``moeprof/__init__.py`` exports; calling the package forwards to
    :func:`moeprof.capture.session.capture`, so both spellings stay one API.
    """

    def __call__(self, model, out, **kwargs):
        from moeprof.capture.session import capture

        return capture(model, out, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
