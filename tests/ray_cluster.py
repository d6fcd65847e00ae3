"""The two-node loopback Ray cluster of the Ray tests, with fault injection armed (see
``moeprof.analysis.engine``: a worker that finds ``$MOEPROF_RAY_FAULTS/<item>`` deletes it and dies)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from moeprof.analysis.engine import FAULTS_ENV, loopback_cluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def faulty_cluster(faults: Path, client_port: int | None = None) -> Iterator[Any]:
    """Two nodes of one CPU each, joined by this process; ``faults`` is inherited by every worker."""
    saved = os.environ.get(FAULTS_ENV)
    os.environ[FAULTS_ENV] = str(faults)  # inherited by the raylets and their workers
    try:
        with loopback_cluster(2, object_store_bytes=100 << 20, client_port=client_port) as cluster:
            yield cluster
    finally:
        if saved is None:
            os.environ.pop(FAULTS_ENV, None)
        else:
            os.environ[FAULTS_ENV] = saved
