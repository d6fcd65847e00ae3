"""Start a Ray cluster of N nodes on this machine, bound to 127.0.0.1 only, until interrupted.

    python scripts/ray_local_cluster.py --nodes 2 --address-file /tmp/ray-address &
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 moeprof analyze TRACE --engine ray --address "$(cat /tmp/ray-address)"

Each node is a separate raylet with its own object store (:func:`moeprof.analysis.engine.loopback_cluster`).
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray from rewriting 127.0.0.1 into the machine's
outward address, where nothing of this cluster listens.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is imported


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("--address-file", help="write the cluster's address here once every node is up")
    args = ap.parse_args()
    from moeprof.analysis.engine import loopback_cluster

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        with loopback_cluster(args.nodes, cpus_per_node=args.cpus_per_node, connect=False) as cluster:
            print(f"{args.nodes} nodes up at {cluster.address}", flush=True)
            if args.address_file:
                with open(args.address_file, "w") as fh:
                    fh.write(cluster.address)
            while not stop:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if args.address_file and os.path.exists(args.address_file):
            os.remove(args.address_file)

if __name__ == "__main__":
    main()
