"""Row groups of one shard read by several threads at once (what the analyze pass does).

A pyarrow ParquetFile read from two threads mixes their row groups' byte ranges up in its read-ahead
cache ("ReadRangeCache did not find matching cache entry"), which the pass reported as a corrupt
shard, at random, or deadlocks in it. Here a shard holds many small row groups, read many times by
four threads: every read must give the rows a single thread reads, in bounded time (daemon threads,
so that a deadlock fails the test instead of hanging it).
"""

from __future__ import annotations

import hashlib
import json
import threading

import numpy as np
import pyarrow.parquet as pq

from moeprof.analysis.aggregate import row_groups
from moeprof.trace import ModelInfo, Trace, TraceWriter
from moeprof.trace.reader import ShardReader

COLUMNS = ["request_id", "step", "phase", "pos", "layer", "experts"]


def _trace_with_small_row_groups(out, rows=200_000, group=2_000):
    model = ModelInfo(name="t", num_experts=64, top_k=4, moe_layers=[0, 1], num_layers=2)
    w = TraceWriter(out, model=model, source="synthetic")
    rng = np.random.default_rng(0)
    for rid in range(4):
        n = rows // 8
        w.set_request(rid, "code", prompt_tokens=n, decode_tokens=0)
        for layer in (0, 1):
            w.write_routing(dict(request_id=rid, step=np.zeros(n, np.int32), phase=np.zeros(n, np.int8),
                                 pos=np.arange(n), layer=layer, experts=rng.integers(0, 64, size=(n, 4))))
    w.close()
    # Rewrite the shard in small row groups (the writer's are 2^20 rows) and record it in the manifest.
    manifest = json.loads((out / "manifest.json").read_text())
    shard = next(s for s in manifest["shards"] if s["kind"] == "routing")
    path = out / shard["path"]
    pq.write_table(pq.read_table(path), path, row_group_size=group, compression="zstd")
    data = path.read_bytes()
    shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _read_on_threads(reader: ShardReader, units: list, threads: int = 4, timeout: float = 60.0) -> list:
    got: list = [None] * len(units)
    todo = iter(range(len(units)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                j = next(todo, None)
            if j is None:
                return
            try:
                got[j] = reader.read_row_group(*units[j], COLUMNS)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                got[j] = exc

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout)
    assert not any(t.is_alive() for t in workers), "reading row groups on threads deadlocked"
    return got


def test_row_groups_of_one_shard_read_by_several_threads(tmp_path):
    trace = Trace.open(_trace_with_small_row_groups(tmp_path / "t"))
    units = row_groups(trace)
    assert len(units) == 100
    want = [ShardReader(trace, [u]).read_row_group(*u, COLUMNS) for u in units]
    for _ in range(20):
        got = _read_on_threads(ShardReader(trace, units), units)
        for g, w in zip(got, want):
            assert not isinstance(g, Exception), g
            assert g.equals(w)
