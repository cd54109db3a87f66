#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu_check.py): the CUDA tier, the Table-1-style cost of
# CIFAR-100 ResNet-164, CIFAR-10 ResNet-56 plain / +SE / +ASR(SE) in about five minutes, and a
# two-run `foldattn sweep --gpus 0` whose runs must have trained on CUDA (seconds).
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--data DIR_OR_TAR_GZ]
# On a bare machine it installs the project first (pip install -e '.[dev]'), then runs in under ten minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import foldattn, pytest, timm, onnxruntime" >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q -e '.[dev]'
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
