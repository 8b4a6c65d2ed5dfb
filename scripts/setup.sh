#!/usr/bin/env bash
# Create .venv with a CPU build of torch and effc installed with its test extras.
# torch is pinned here (the package itself accepts torch>=2.6): an unpinned torch would pull
# a multi-GB CUDA build, while torch==2.13.0 installs a CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# graphviz's `dot` draws the debug dump's graphs; optional, so a failure here is only reported.
if ! command -v dot >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq graphviz) >/dev/null 2>&1 \
      || echo "note: graphviz not installed; debug dumps will say so instead of drawing graphs"
  else
    echo "note: install graphviz (dot) to get SVG drawings in debug dumps"
  fi
fi
