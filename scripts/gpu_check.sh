#!/usr/bin/env bash
# GPU validation of effc's Triton code (run on a CUDA machine; CI has none).
#
# Each pass runs on the GPU first (tests/test_passes_on_device.py: a pass that builds a
# constant on the wrong device fails there, not on a CPU). The kernel and lowering tests run
# with their tensors on the GPU (EFFC_TEST_DEVICE=cuda), so
# the generated kernels are compiled and autotuned rather than interpreted; then the lowering
# benchmark times effc-triton against inductor and eager, and the hypercomplex benchmark times
# the trained PHM model and phm_linear against dense (the goal at batch 1: >= 0.6 n times
# faster than dense), the shift_linear kernels against cuBLAS, the token_skip gather/scatter
# kernels and a routed MLP block, and select_attention against SDPA at long contexts, all
# recorded into BENCHMARKS.md.
#
# Uses the Python that already holds torch + triton (PYTHON, default python3): GPU machines
# here have no network, so nothing is installed. Every step runs under a time limit
# (GPU_CHECK_TEST_S for the tests, GPU_CHECK_BENCH_S per benchmark, twice that for
# the lowering benchmark) so that a slow step costs
# its own numbers only; GPU_CHECK_OUT, when set, receives the log and the updated
# BENCHMARKS.md; GPU_CHECK_STEPS (space-separated step names) runs only those. Extra arguments
# go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${GPU_CHECK_OUT:-}
TEST_S=${GPU_CHECK_TEST_S:-900}
BENCH_S=${GPU_CHECK_BENCH_S:-300}
unset TRITON_INTERPRET
export EFFC_TEST_DEVICE=cuda PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG=${OUT_DIR:+$OUT_DIR/gpu_check.log}
LOG=${LOG:-/dev/null}
"$PY" -c "import torch, triton, transformers; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', \
transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG" || exit 1

status=0  # a failing step must not cost the others' numbers: run all, report all
step() {  # step NAME SECONDS COMMAND...: run under a limit, log, remember a failure
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    [[ " ${GPU_CHECK_STEPS:-$name} " == *" $name "* ]] || return 0  # a chosen subset of steps
    echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=$rc
    [ -z "$OUT_DIR" ] || cp BENCHMARKS.md "$OUT_DIR/"  # what is recorded so far survives a kill
}

# pytest-xdist and pytest-timeout, where installed, spread the kernel compiles over the cores
# and stop a hung test instead of the whole check; xdist hands tests out in this order, so the
# files a time-boxed run is least likely to have reached before come first
extra=()
"$PY" -c "import xdist" 2>/dev/null && extra+=(-n "${GPU_CHECK_WORKERS:-8}")
"$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 240)
step tests "$TEST_S" "$PY" -m pytest -q -p no:cacheprovider -p scripts.pytest_live_failures -rfE \
    --durations=15 "${extra[@]}" \
    tests/test_passes_on_device.py \
    "tests/passes/test_token_skip.py::test_routed_graphs_lower_to_triton_with_the_routed_nodes_left_to_eager" \
    tests/compiler/test_generate.py tests/compiler/lowering/test_shift_lowering.py \
    tests/compiler/lowering/test_phm_lowering.py tests/test_examples.py \
    tests/compiler/lowering/test_triton_lowering.py tests/compiler/lowering/test_graph_rewrites.py \
    tests/kernels tests/compiler/lowering/test_codegen.py "$@"
# the short benchmarks first; the lowering benchmark (compiles four variants of three models)
# records after each of its parts, decode shapes (b) first
step bench_kv_proj "$BENCH_S" "$PY" benchmarks/bench_kv_proj.py --part d --record
step bench_shift_add "$BENCH_S" "$PY" benchmarks/bench_shift_add.py --part c --record
step bench_hypercomplex "$BENCH_S" "$PY" benchmarks/bench_hypercomplex.py --part a,b,d --record
step bench_token_skip "$BENCH_S" "$PY" benchmarks/bench_token_skip.py --part c --record
step bench_lowering "$((2 * BENCH_S))" "$PY" benchmarks/bench_lowering.py --part b,a,c --record
step lowering_coverage "$BENCH_S" "$PY" benchmarks/lowering_coverage.py
echo "gpu_check: exit status $status" | tee -a "$LOG"
exit $status
