#!/usr/bin/env bash
# Installs mixtral-export and its test/export extras into the current Python.
# torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
# A GPU user who already has a CUDA torch keeps it (any torch>=2.4 satisfies the extras).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
# EXTRAS adds more: EXTRAS=test,serve,ray,plot bash scripts/install.sh (test already has the server's deps)
"$PY" -m pip install -q -e ".[${EXTRAS:-test}]"
