#!/usr/bin/env bash
# Set up .venv and run the quickstart: compile a small Hugging Face model with effc, print its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/quickstart.py "$@"
