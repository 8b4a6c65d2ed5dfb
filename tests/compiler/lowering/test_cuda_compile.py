"""Every kernel effc generates compiles for a CUDA GPU, checked on a machine without one.

The interpreter runs kernels on the CPU but accepts code the GPU compiler rejects (and never
allocates shared memory); Triton can compile to a cubin with no device, so
tests/cuda_compile_check.py lowers real graphs for CUDA, records each launch, and compiles
every distinct kernel and autotune config for sm_90 (the H100). It runs in a subprocess
because the Triton interpreter, on for the rest of the suite, must be off there. Takes ~1 min.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "cuda_compile_check.py"
SM90_SHARED_BYTES = 232448  # largest shared memory one block may use on sm_90 (227 KiB)


@pytest.mark.slow
def test_every_generated_kernel_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), EFFC_CACHE_DIR=str(tmp_path / "effc"))
    done = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode and "ptxas" in done.stderr:
        pytest.skip("this triton has no ptxas to compile for CUDA")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    workloads = [r for r in rows if "workload" in r]
    compiles = [r for r in rows if "kernel" in r]
    assert len(workloads) == 18 + 5 and all(w["launches"] > 0 for w in workloads), workloads
    failed = [r for r in compiles if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1)[:4000]
    # every kernel kind and variant was among them: the GEMM templates over all their
    # autotune configs, persistent and looped rows, pointwise chains; fp32, fp16 and bf16
    names = {r["kernel"] for r in compiles}
    assert any(n.startswith("low_rank_linear") for n in names)
    assert any(n.startswith("low_rank_linear") and n.endswith("_t") for n in names)  # two-step
    assert any(n.startswith("linear_") for n in names)
    assert any(n.startswith("row_") and n.endswith("_looped") for n in names)
    assert any(n.startswith("row_") and not n.endswith("_looped") for n in names)
    assert any(n.startswith("fused_") for n in names)
    assert {"*fp32", "*fp16", "*bf16"} <= {d for r in compiles for d in r["dtypes"]}
    from effc.compiler.lowering.codegen.templates import DENSE_CONFIGS, LOW_RANK_CONFIGS

    swiglu = {tuple(r["consts"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
              for r in compiles if r["kernel"] == "linear_silu_mul"}
    assert swiglu == {c[:3] for c in DENSE_CONFIGS}
    rank128 = [r for r in compiles if r["consts"].get("R_PAD") == 128]
    assert len(rank128) == 2 * len(LOW_RANK_CONFIGS)  # fp32 and bf16, every config
    too_big = [r for r in compiles if r["shared"] > SM90_SHARED_BYTES]
    assert not too_big, too_big
    # pointwise and row kernels round every op as eager does: no fp16/bf16 multiply-add
    # contracted into an FMA (with Triton's default fp fusion, rope compiles to fma.rn.f16)
    contracted = [r for r in compiles if r["kernel"].startswith(("fused_", "row_"))
                  and r["half_fma"]]
    assert not contracted, contracted
