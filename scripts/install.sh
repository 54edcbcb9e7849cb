#!/usr/bin/env bash
# Installs mixtral-export and its test/export extras into the current Python ($PYTHON, default python3).
#
# PyTorch comes first, as the right build for this machine: on a CPU machine a bare `torch==2.13.0`
# from PyPI is the multi-GB CUDA build with its CUDA libraries.
#   1. a torch that is already installed is kept (a GPU user installs the CUDA build first);
#   2. a torch wheel that pip finds without any index (a local wheelhouse, as on machines with no
#      route to PyTorch's index) is used: the probe asks no server, so it answers in a second;
#   3. a machine with an NVIDIA GPU (nvidia-smi) gets PyPI's build, which is the CUDA one;
#   4. any other machine gets PyTorch's CPU build from PyTorch's own index, as its install page gives
#      it (override the index with TORCH_INDEX_URL).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH="torch==2.13.0"
CPU_INDEX=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "install: keeping the installed torch" >&2
elif "$PY" -m pip install -q --dry-run --no-index --no-deps "$TORCH" >/dev/null 2>&1; then
    echo "install: $TORCH from a local wheel" >&2
    "$PY" -m pip install -q "$TORCH"
elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "install: $TORCH, the CUDA build (an NVIDIA GPU is present)" >&2
    "$PY" -m pip install -q "$TORCH"
else
    echo "install: $TORCH, the CPU build from $CPU_INDEX" >&2
    "$PY" -m pip install -q "$TORCH" --index-url "$CPU_INDEX"
fi
# EXTRAS adds more: EXTRAS=test,serve,ray,plot bash scripts/install.sh (test already has the server's deps);
# EXTRAS=test,llama adds llama.cpp for bench (llama-cpp-python compiles llama.cpp: minutes, needs a C++ compiler)
"$PY" -m pip install -q -e ".[${EXTRAS:-test}]"
