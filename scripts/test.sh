#!/usr/bin/env bash
# Installs, then runs the test suite (everything but tests marked slow or gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m pytest -q "$@"
