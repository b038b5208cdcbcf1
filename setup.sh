#!/usr/bin/env bash
# Create .venv (once) and install distmlip with its test extras. Idempotent.
# torch is pinned to the CPU build first, so the package's `torch>=2.4` range installs nothing
# more (an unpinned torch would pull a multi-GB CUDA build). On a GPU machine, install the
# CUDA torch you want first, then `pip install -e .[test]`.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,bench]" 2>&1 \
  | grep -v -E "^WARNING: Location|^$" || true
.venv/bin/python -c "import distmlip, torch, vesin; print('distmlip', distmlip.__version__, 'torch', torch.__version__)"
