#!/usr/bin/env bash
# The main job on the embedded tiny model: build the checkpoint, export ONNX, generate on
# ONNX Runtime, verify against eager PyTorch and the transformers reference.
#
# Usage: bash scripts/demo.sh [OUT]
#   OUT  the folder for the checkpoint, the artifact and verify.json (default: out/demo); a relative
#        OUT is taken from the folder the script is run from, not from the checkout.
# It installs the package first (scripts/install.sh; $PYTHON, default python3, runs both).
set -euo pipefail
out=${1:-out/demo}
case "$out" in
    /*) ;;
    *) out="$PWD/$out" ;;  # before the cd below
esac
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m mixtral_export demo "$out"
