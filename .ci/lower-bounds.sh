#!/usr/bin/env bash
# CI: the whole test suite on the OLDEST version of every dependency the project admits.
# .ci/run tests the newest releases; this proves the other end of each range in pyproject.toml.
# Runs from the repo root after .ci/run made .venv; builds its own .venv-lower (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
# The pins must be pyproject.toml's lower bounds, or this job would prove the wrong versions.
# .ci/run made .venv: check that first, before minutes of installs (the suite below checks it again).
if [ -x .venv/bin/python ]; then .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_lower_bounds.py; fi
rm -rf .venv-lower
python3 -m venv .venv-lower
. .venv-lower/bin/activate
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0            # the CPU wheel; first, so nothing pulls CUDA
pip install -q -c .ci/lower-bounds.txt -e '.[capture,test]'
pip list --format=freeze | grep -iE "^($(grep -oE '^[A-Za-z0-9_.-]+' .ci/lower-bounds.txt | paste -sd'|'))=="
python -m pytest -q
