#!/usr/bin/env bash
# The distmlip bench on 1..8 GPUs with NCCL (one worker per GPU). Run on a GPU node:
#   bash benchmarks/gpu_bench.sh [model] [out_dir]
# It records the device name next to the results and saves each configuration as it finishes
# (`distmlip bench` rewrites its JSON and markdown after every one). Needs a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-chgnet}
OUT=${2:-docs/benchmarks/gpu}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then echo "no CUDA device visible; nothing to do" >&2; exit 1; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt"
NPROCS=""
for p in 1 2 4 8; do [ "$p" -le "$NGPU" ] && NPROCS="$NPROCS $p"; done
# The ghost baseline needs the model's layer count (CHGNet has none: its receptive field mixes
# 6 Å atom hops and 3 Å bond hops), so it runs only for models that declare one.
HALOS=$("$PY" -c "from distmlip.models import resolve_model
print('exchange ghost' if resolve_model('$MODEL').num_layers else 'exchange')")
# NCCL exactness first (the CUDA tests skip themselves with too few devices).
"$PY" -m pytest -q tests/test_cuda.py | tee "$OUT/test_cuda.txt"
# Sizes that fit one 80 GB GPU at P = 1 for CHGNet (≈ 0.75 MB per atom).
"$PY" -m distmlip bench --model "$MODEL" --device cuda --crystal si \
  --atoms 2000 10000 50000 --nprocs $NPROCS --partitioners slab rcb \
  --halo $HALOS --dtype float32 --total-threads 8 --out "$OUT"
