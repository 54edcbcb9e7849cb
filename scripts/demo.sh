#!/usr/bin/env bash
# The main job on the embedded tiny model: build the checkpoint, export ONNX, generate on
# ONNX Runtime, verify against eager PyTorch and the transformers reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m mixtral_export demo "${1:-out/demo}"
