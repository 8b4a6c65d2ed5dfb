#!/usr/bin/env bash
# GPU validation of effc's Triton code (run on a CUDA machine; CI has none).
#
# The kernel and lowering tests run with their tensors on the GPU (EFFC_TEST_DEVICE=cuda), so
# the generated kernels are compiled and autotuned rather than interpreted; then the lowering
# benchmark times effc-triton against inductor and eager, and the hypercomplex benchmark times
# the trained PHM model and phm_linear against dense (the goal at batch 1: >= 0.6 n times
# faster than dense), the token_skip gather/scatter kernels and a routed MLP block, and
# select_attention against SDPA at long contexts, all recorded into BENCHMARKS.md.
# Uses the Python that already holds torch + triton (PYTHON, default python3): GPU machines
# here have no network, so nothing is installed. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
unset TRITON_INTERPRET
export EFFC_TEST_DEVICE=cuda PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
status=0  # a failing test must not cost the benchmark numbers: run both, report both
"$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/compiler/lowering/test_codegen.py \
    tests/compiler/lowering/test_triton_lowering.py tests/compiler/lowering/test_graph_rewrites.py \
    tests/compiler/test_generate.py tests/test_examples.py "$@" || status=$?
"$PY" benchmarks/bench_lowering.py --record || status=$?
"$PY" benchmarks/bench_hypercomplex.py --part a,b,d --record || status=$?
"$PY" benchmarks/bench_shift_add.py --part c --record || status=$?
"$PY" benchmarks/bench_token_skip.py --part c --record || status=$?
"$PY" benchmarks/bench_kv_proj.py --part d --record || status=$?
"$PY" benchmarks/lowering_coverage.py || status=$?
echo "gpu_check: exit status $status"
exit $status
