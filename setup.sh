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
# Second step: fairchem-core (eSEN) needs e3nn>=0.5, mace-torch pins e3nn==0.4.4 but runs with
# 0.6 (tested). pip reports that pin as a conflict; everything else must resolve.
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[fairchem]" 2>&1 \
  | grep -v -E "^WARNING: Location|^$|dependency resolver does not currently|mace-torch .* requires e3nn==0.4.4" || true
# Every model family imports in this one environment (a failed install above shows here).
.venv/bin/python -W ignore -c "
import distmlip, torch, vesin, vesin_torch, e3nn, chgnet, mace, matgl, fairchem.core
print('distmlip', distmlip.__version__, 'torch', torch.__version__, 'e3nn', e3nn.__version__,
      'fairchem-core', fairchem.core.__version__)" 2>&1 | grep -v -i -E "warp|cuda|devices|\"cpu\"|kernel cache|/root|^ *$"
