#!/usr/bin/env bash
# Set up .venv and run the test suite (Triton kernels run under the interpreter on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
