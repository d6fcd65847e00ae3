#!/usr/bin/env bash
# CI step for `--engine ray` (issue 16): install the ray extra into the main .venv that .ci/run made,
# then run the tests that start a real two-node Ray cluster on this machine (loopback only).
# About 3 minutes on 2 shared cores (test_ray_placement.py: under 1 more): one cluster per module, ~20 s to start.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
pip install -q -e '.[ray]'
python -c "import ray; print('ray', ray.__version__)"
# The tests set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 themselves (loopback only); the timeout guards
# against a cluster that never comes up.
timeout 1200 python -m pytest -q tests/test_ray.py tests/test_ray_placement.py
