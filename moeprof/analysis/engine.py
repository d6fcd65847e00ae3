"""Where per-shard work runs: threads of this process (``local``) or tasks of a Ray cluster (``ray``).

An engine does two things: ``map`` (one call per item, results in item order) and ``map_reduce``
(one call per item, partial results merged pairwise in a tree). Every merge moeprof hands it is
exact and order-free (sums of counts, unions of bottom-k samples), so a run on Ray gives the same
numbers as a local run. Ray is an optional extra (``pip install 'moeprof[ray]'``); nothing here
imports it until ``--engine ray`` asks for it.

On Ray, a task whose worker dies is retried (``max_retries``); an error raised on purpose (a corrupt
shard, a bad expert id: a :class:`~moeprof.errors.MoeprofError`) is not retried and stops the run
with its own message. For fault-injection tests, a worker that finds the file
``$MOEPROF_RAY_FAULTS/<item name>`` deletes it and dies, once, as a crashed machine would.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Iterator, Sequence

from moeprof.errors import MoeprofError, UsageError

ENGINES = ("local", "ray")
RAY_EXTRA = "pip install 'moeprof[ray]'"
FAULTS_ENV = "MOEPROF_RAY_FAULTS"


class EngineError(MoeprofError):
    """A distributed run that could not finish (a task that kept failing, a cluster out of reach)."""


class Engine:
    """Runs per-item functions; see the module docstring. ``fn(item, shared)``, ``merge(a, b)``."""

    name = "engine"
    workers = 1

    def map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], shared: Any = None) -> list[Any]:
        raise NotImplementedError

    def map_reduce(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], merge: Callable[[Any, Any], Any],
                   shared: Any = None, progress: Callable[[int], None] | None = None) -> Any:
        raise NotImplementedError

    def put(self, value: Any) -> Any:
        """A handle that stands for ``value`` as an item of ``map`` calls: ``value`` itself here, one
        copy in the object store on Ray (rounds over the same data then ship it once)."""
        return value


class LocalEngine(Engine):
    """Threads of this process (pyarrow and numpy release the GIL in the heavy parts)."""

    name = "local"

    def __init__(self, threads: int | None = None) -> None:
        self.workers = threads or os.cpu_count() or 1

    def map(self, fn, items, shared=None):
        if self.workers == 1 or len(items) <= 1:
            return [fn(item, shared) for item in items]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="moeprof-engine") as pool:
            return list(pool.map(lambda item: fn(item, shared), items))

    def map_reduce(self, fn, items, merge, shared=None, progress=None):
        acc: list[Any] = []
        lock = threading.Lock()

        def run(item: Any) -> None:
            part = fn(item, shared)
            with lock:  # merging is cheap next to reading; one accumulator keeps memory flat
                acc[:] = [part if not acc else merge(acc[0], part)]
            if progress is not None:
                progress(1)

        if self.workers == 1 or len(items) <= 1:
            for item in items:
                run(item)
        else:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="moeprof-engine") as pool:
                for fut in as_completed([pool.submit(run, item) for item in items]):
                    fut.result()
        return acc[0] if acc else None


def _call(fn: Callable[[Any, Any], Any], item: Any, shared: Any) -> Any:
    """Body of every Ray task (also where an armed fault fires)."""
    faults = os.environ.get(FAULTS_ENV)
    if faults:
        armed = os.path.join(faults, item_name(item))
        try:
            os.remove(armed)
        except FileNotFoundError:
            pass
        else:
            os._exit(1)  # the worker dies mid-task, as on a lost machine: Ray retries the task
    return fn(item, shared)


def item_name(item: Any) -> str:
    """A file-name-safe label of an item: the last part of its first field (a shard's file name)."""
    first = item[0] if isinstance(item, tuple) and item else item
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(first).rstrip("/").rsplit("/", 1)[-1])[-120:]


class RayEngine(Engine):
    """Tasks on a Ray cluster: ``address`` None starts a local one, ``auto`` joins the running one,
    ``ray://host:port`` connects a client. A session already initialised in this process is reused."""

    name = "ray"

    def __init__(self, address: str | None = None, max_retries: int = 3) -> None:
        self.ray = import_ray()
        ray = self.ray
        if not ray.is_initialized():
            # A Ray client (ray://) gets a server process of its own on the head, which can fail to
            # start when the head is busy ("Starting Ray client server failed"): try a few times.
            attempts = 3 if str(address or "").startswith("ray://") else 1
            for attempt in range(1, attempts + 1):
                try:
                    ray.init(address=address, log_to_driver=False, include_dashboard=False,
                             configure_logging=False)
                    break
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    if attempt == attempts or isinstance(exc, ValueError):
                        raise EngineError(
                            f"--address {address or '(local)'}: cannot start or reach a Ray cluster ({exc})"
                        ) from None
                    time.sleep(2.0 * attempt)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # SPREAD: shard tasks read storage; spreading them over nodes adds up the nodes' bandwidth.
        self._task = ray.remote(max_retries=max_retries, retry_exceptions=False, scheduling_strategy="SPREAD")(_call)
        self._merge = ray.remote(max_retries=max_retries, retry_exceptions=False)(_merge_call)

    def _get(self, refs: Any) -> Any:
        ray = self.ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, MoeprofError):
                raise cause from None
            raise EngineError(f"a Ray task failed: {cause if cause is not None else exc}") from None
        except ray.exceptions.RayError as exc:  # worker crashed more often than max_retries, node lost
            raise EngineError(f"a Ray task failed after its retries: {exc}") from None

    def put(self, value):
        return self.ray.put(value)  # a top-level task argument: Ray hands the task the value

    def map(self, fn, items, shared=None):
        ref = self.ray.put(shared)
        return self._get([self._task.remote(fn, item, ref) for item in items])

    def map_reduce(self, fn, items, merge, shared=None, progress=None):
        ray = self.ray
        if not items:
            return None
        ref = ray.put(shared)
        leaves = [self._task.remote(fn, item, ref) for item in items]
        leaf_ids = {leaf.hex() for leaf in leaves}
        # Merge in a tree as results finish: two ready results become one merge task, remotely, so
        # the driver holds one object whatever the number of shards. An error inside a task travels
        # up the tree to the final ``get`` (with its own message and the shard it names).
        level: list[Any] = []
        pending = list(leaves)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, fetch_local=False)
            if progress is not None:
                progress(sum(r.hex() in leaf_ids for r in ready))
            level.extend(ready)
            while len(level) >= 2:
                pending.append(self._merge.remote(merge, level.pop(), level.pop()))
        return self._get(level[0])


def _merge_call(merge: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
    return merge(a, b)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(f"--engine ray needs Ray, which is not installed; install it with: {RAY_EXTRA}") from None
    return ray


def get_engine(name: str | Engine | None = "local", address: str | None = None,
               threads: int | None = None) -> Engine:
    """The engine called ``name`` (``local`` or ``ray``); an :class:`Engine` is returned as is."""
    if isinstance(name, Engine):
        return name
    if name in (None, "local"):
        if address is not None:
            raise UsageError("--address names a Ray cluster; it needs --engine ray")
        return LocalEngine(threads)
    if name == "ray":
        return RayEngine(address)
    raise UsageError(f"--engine {name!r}: choose one of {', '.join(ENGINES)}")


@contextlib.contextmanager
def loopback_cluster(nodes: int = 2, *, cpus_per_node: int = 1, object_store_bytes: int = 512 << 20,
                     client_port: int | None = None, connect: bool = True) -> Iterator[Any]:
    """A Ray cluster of ``nodes`` separate raylets on this machine, bound to 127.0.0.1 only.

    What the tests, the benchmarks and ``scripts/ray_local_cluster.py`` run ``--engine ray`` on: each
    node has its own object store and ``cpus_per_node`` CPUs (``ray.cluster_utils.Cluster``, which
    Ray's own tests use for multi-node runs on one host; ``ray start`` refuses a second node on one
    host when loopback is forced). ``client_port`` also opens a Ray client server (``ray://``) there.
    With ``connect`` this process joins the cluster (``ray.init``) until the block ends. Yields the
    ``Cluster``; everything is shut down on leaving, also on error.
    """
    # Read when Ray is imported: keeps Ray from rewriting 127.0.0.1 into the machine's outward
    # address, where nothing of this cluster listens (ray.init would then wait forever).
    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise RuntimeError("loopback_cluster: set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = import_ray()
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=cpus_per_node, node_ip_address="127.0.0.1", object_store_memory=object_store_bytes)
    head = dict(node, include_dashboard=False)
    if client_port is not None:
        head["ray_client_server_port"] = client_port
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        if connect:
            ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        yield cluster
    finally:
        if connect:
            ray.shutdown()
        cluster.shutdown()
