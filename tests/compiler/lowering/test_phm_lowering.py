"""`effc.phm_linear` through the Triton lowering: the phm template with a generated epilogue.

The op's kernel text (TEMPLATE in effc/kernels/phm.py) has an epilogue slot; the lowering fills
it with the pointwise nodes that follow the op (bias, activation, residual add, gating
multiply, casts), so each op and its epilogue are one kernel. Kernels run under the Triton
interpreter with one fixed tiling (phm_template.INTERPRETER_CONFIG: 32 rows, 16-wide p and K
blocks); the shapes below are ragged against all three (37 rows, p = q = 20: two blocks each,
the second partly masked) or smaller than one block (p = 5, q = 7). Every kernel writes into
NaN-poisoned outputs, so an element it skips cannot pass.

Tolerances, measured and justified:
- fp32: eager's reference is two matmuls (x's blocks against the stacked s_t, then the n x n
  mixing); the kernel mixes first and sums T * q products per output in another order. The
  operands give O(1) outputs: rtol = atol = 1e-5, as for the other GEMM templates (measured:
  |out - eager| <= 6e-7 (|eager| + 1)).
- fp16/bf16: eager rounds its intermediate x_j . s_t to the dtype, the kernel rounds the
  mixed blocks sum_j a_t[i, j] x_j instead (the op's own kernel too), so the GEMM's output may
  differ by about one unit in the last place before the epilogue's roundings (which match
  eager's op by op) carry it on, through an add and a doubling at most here: rtol = atol =
  4 eps(dtype) on O(1) outputs (measured: |out - eager| <= 2.5 eps (|eager| + 1) for bf16,
  1.7 eps for fp16). A graph computed in a half type and cast to fp32 keeps its tolerance.
"""

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
from lowering_helpers import (DEVICE, as_tuple, assert_close, compile_triton, lower,
                              on_device, poisoned_outputs, rand, traced)  # noqa: F401 (fixture)

import effc
import effc.kernels.phm  # noqa: F401  (torch.ops.effc.phm_linear)
from effc.compiler.lowering.codegen import cache, generate, phm_template
from effc.compiler.lowering.codegen.templates import GemmLauncher
from effc.compiler.lowering.ops import classify
from effc.compiler.lowering.partition import partition

# modules and inputs on EFFC_TEST_DEVICE (on_device is a lowering_helpers fixture)
pytestmark = pytest.mark.usefixtures("on_device")

PHM = torch.ops.effc.phm_linear
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (lead, T, n, p, q): rows and p, q ragged over two blocks; and all of them inside one block
SHAPES = [((37,), 2, 3, 20, 20), ((3, 5), 4, 2, 5, 7)]
SHAPE_IDS = ["M37T2n3p20q20", "M3x5T4n2p5q7"]


def factors(terms, n, p, q, dtype=torch.float32, seed=0, bias=True):
    """a [T, n, n], s [T, p, q] and bias [n p], scaled so outputs are O(1) with both signs."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(terms, n, n, generator=g, device="cpu") / n ** 0.5
    s = torch.randn(terms, p, q, generator=g, device="cpu") / (terms * q) ** 0.5
    b = torch.randn(n * p, generator=g, device="cpu") * 0.5 if bias else None
    return [None if t is None else t.to(dtype=dtype, device=DEVICE) for t in (a, s, b)]


class PhmBlock(nn.Module):
    """A PHM layer's epilogues: gelu(phm(x) + b) + residual, and a SwiGLU gate
    silu(phm_1(x)) * phm_2(x) whose multiply reads the second op's output."""

    def __init__(self, terms, n, p, q, dtype):
        super().__init__()
        for i in range(3):
            a, s, b = factors(terms, n, p, q, dtype, seed=10 + i, bias=i != 1)
            self.register_buffer(f"a{i}", a)
            self.register_buffer(f"s{i}", s)
            self.register_buffer(f"b{i}", b)

    def forward(self, x, r):
        h = F.gelu(PHM(x, self.a0, self.s0, self.b0)) + r
        gate = F.silu(PHM(x, self.a1, self.s1)) * PHM(x, self.a2, self.s2, self.b2)
        return h, gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_phm_ops_and_their_epilogues_are_one_kernel_each(shape, dtype):
    """torch.compile with lowering='triton': the report shows each phm op with its epilogue in
    one kernel (the gate's second op is a kernel of its own, whose output the first one's
    epilogue reads), nothing fusable left eager, outputs as eager's."""
    lead, terms, n, p, q = shape
    model = PhmBlock(terms, n, p, q, dtype)
    x, r = rand(*lead, n * q, dtype=dtype, seed=1), rand(*lead, n * p, dtype=dtype, seed=2)
    with torch.inference_mode():
        with poisoned_outputs():
            out = compile_triton(model)(x, r)
        ref = model(x, r)
    (g,) = effc.report().graphs
    assert g.fallbacks == []
    assert [(k.name, k.kind, len(k.nodes)) for k in g.kernels] == [
        ("phm_linear_gelu_add", "gemm", 3), ("phm_linear_silu_mul", "gemm", 3),
        ("phm_linear", "gemm", 1)]
    assert g.kernel_counts() == {"kernels": 3, "distinct_kernels": 3, "fused_nodes": 7,
                                 "fallbacks": 0}
    # Dynamo names nodes after the op or the variable they are assigned to
    assert [(k.nodes, k.outputs) for k in g.kernels] == [
        (["phm_linear", "gelu", "h"], ["h"]), (["phm_linear_1", "silu", "gate"], ["gate"]),
        (["phm_linear_2"], ["phm_linear_2"])]
    assert not any("phm_linear" in ops for ops in g.eager_ops.values())
    assert "triton: 3 kernels (3 distinct) computing 7 FX nodes" in str(effc.report())
    for o, e in zip(out, ref, strict=True):
        assert_close(o, e)


# epilogues over one phm op (x, a, s, b, r: r a residual of the output's shape)
EPILOGUES = {
    "plain": lambda x, a, s, b, r: PHM(x, a, s, b),
    "no_bias_relu": lambda x, a, s, b, r: torch.relu(PHM(x, a, s)),
    "gelu_tanh": lambda x, a, s, b, r: F.gelu(PHM(x, a, s, b), approximate="tanh"),
    "scale_residual": lambda x, a, s, b, r: PHM(x, a, s, b) * 0.5 + r,
    "bias_like_and_cast": lambda x, a, s, b, r: (PHM(x, a, s, bias=None) + b).float() * 2.0,
    # the op's own output is returned too: stored by the kernel besides the epilogue's
    "materialized": lambda x, a, s, b, r: (lambda y: (y, torch.tanh(y * 2.0) - r))(
        PHM(x, a, s, b)),
}

FUSED_NODES = {"plain": 1, "no_bias_relu": 2, "gelu_tanh": 2, "scale_residual": 3,
               "bias_like_and_cast": 4, "materialized": 4}


def _inputs(shape, dtype):
    lead, terms, n, p, q = shape
    a, s, b = factors(terms, n, p, q, dtype, seed=sum(lead) + p)
    return [rand(*lead, n * q, dtype=dtype, seed=3), a, s, b,
            rand(*lead, n * p, dtype=dtype, seed=4)]


def check(fn, *inputs):
    """Lower `fn` (lowering_helpers.lower: outputs poisoned), compare with eager; every phm op
    and every epilogue node is in a gemm kernel. Returns (report, sources, lowered graph)."""
    out, report, gm, sources = lower(fn, *inputs)
    assert report.kernels and not report.fallbacks, report.fallbacks
    assert all(k.kind == "gemm" and k.name.startswith("phm_linear") for k in report.kernels)
    assert [n for n in gm.graph.nodes if n.op.startswith("call") and classify(n)] == []
    for o, r in zip(as_tuple(out), as_tuple(fn(*inputs)), strict=True):
        assert_close(o, r, inputs[0].dtype)
    return report, sources, gm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", list(EPILOGUES))
def test_phm_linear_with_fused_epilogue(name, shape, dtype):
    report, _, _ = check(EPILOGUES[name], *_inputs(shape, dtype))
    (kernel,) = report.kernels
    assert len(kernel.nodes) == FUSED_NODES[name]
    assert kernel.outputs == ([kernel.nodes[0], kernel.nodes[-1]] if name == "materialized"
                              else [kernel.nodes[-1]])


@pytest.mark.skipif(DEVICE.type == "cuda", reason="about the interpreter's tiling; CUDA autotunes")
def test_interpreter_runs_one_fixed_config_over_ragged_blocks():
    shape = SHAPES[0]
    _, sources, gm = check(EPILOGUES["scale_residual"], *_inputs(shape, torch.float32))
    (text,) = sources.values()
    assert "autotune" not in text and "fixed config for the interpreter" in " ".join(text.split())
    (launcher,) = [n.target for n in gm.graph.nodes if isinstance(n.target, GemmLauncher)]
    config = phm_template.INTERPRETER_CONFIG
    assert launcher.plan.template == "phm" and launcher.launches == 1
    assert launcher.last_config == config
    (rows,), _, _, p, q = shape
    # rows, p and q each span two blocks, the second partly masked
    for size, block in ((rows, config["BLOCK_M"]), (p, config["BLOCK_P"]), (q, config["BLOCK_K"])):
        assert block < size < 2 * block


def test_generated_source_fills_the_ops_template_slot():
    """The op's own kernel and the generated one are the same TEMPLATE: everything up to the
    epilogue is shared; the slot holds the op's store in one and the fused nodes in the other."""
    import effc.kernels.phm as phm

    fn = lambda x, a, s, b, r: F.silu(PHM(x, a, s, b)) * r
    _, sources, _ = check(fn, *_inputs(SHAPES[0], torch.float32))
    (text,) = sources.values()
    op_text = inspect.getsource(phm._phm_linear_kernel.fn)
    body = lambda t: t.split("):\n", 1)[1].split("# ---- epilogue")[0]
    # the one other slot: how the mixed blocks are rounded to x's dtype (a no-op in fp32)
    assert "xt_in = xt\n" in body(text) and "xt_in = xt.to(x_ptr.dtype.element_ty)\n" in body(op_text)
    assert body(text) == body(op_text).replace("xt.to(x_ptr.dtype.element_ty)", "xt")
    assert "def phm_linear_silu_mul(\n    x_ptr, a_ptr, s_ptr, bias_ptr, in0_ptr, out0_ptr," in text
    assert "# silu = silu(phm_linear, inplace=False)" in text and "# mul = mul(silu, r)" in text
    assert "_apply_activation" in op_text and "_apply_activation" not in text


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_phm_output_keeps_eager_permuted_layout_and_reads_strided_operands(dtype):
    """`residual + phm(x)` with a channels-first residual takes the residual's layout in eager;
    the kernel stores through strides. x, a and s are non-contiguous views."""
    lead, terms, n, p, q = (3, 7), 2, 3, 20, 20
    x = rand(n * q, *lead, dtype=dtype, seed=5).permute(1, 2, 0)
    a, s, b = factors(terms, n, p, q, dtype, seed=6)
    a, s = a.transpose(1, 2).contiguous().transpose(1, 2), s.transpose(1, 2).contiguous().transpose(1, 2)
    r = rand(lead[0], n * p, lead[1], dtype=dtype, seed=7).permute(0, 2, 1)

    def fn(x, a, s, b, r):
        h = r + PHM(x, a, s, b)
        return h, F.gelu(h) * 2.0

    assert fn(x, a, s, b, r)[0].stride()[-1] != 1 and not (a.is_contiguous() or s.is_contiguous())
    _, sources, _ = check(fn, x, a, s, b, r)
    assert "in eager's layout" in next(iter(sources.values()))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="one graph, two sizes: checked on the CPU")
def test_dynamic_row_count_one_graph_two_sizes():
    terms, n, p, q = 2, 3, 20, 20
    a, s, b = factors(terms, n, p, q)
    fn = lambda x: F.gelu(PHM(x, a, s, b)) * 2.0
    compiled = compile_triton(fn, dynamic=True)
    for rows in (37, 20):
        x = rand(rows, n * q, seed=rows)
        with torch.inference_mode(), poisoned_outputs():
            out = compiled(x)
        assert_close(out, fn(x))
    (g,) = effc.report().graphs  # one graph for both sizes
    assert [k.name for k in g.kernels] == ["phm_linear_gelu_mul"] and g.fallbacks == []


def test_a_phm_op_on_a_flattened_input_is_computed_on_the_input():
    """The hypercomplex rewrite of a GPT-2 Conv1D site: phm(x.reshape(-1, K)).view(...); the
    views are dropped so the tanh fuses (graph_rewrites.unflatten_gemms)."""
    lead, terms, n, p, q = (3, 7), 2, 3, 20, 20
    a, s, b = factors(terms, n, p, q, seed=8)
    x = rand(*lead, n * q, seed=9)
    fn = lambda x, a, s, b: torch.tanh(PHM(x.reshape(-1, n * q), a, s, b).view(*lead, n * p))
    out, report, _, _ = lower(fn, x, a, s, b)
    (kernel,) = report.kernels
    assert kernel.name == "phm_linear_tanh" and len(kernel.nodes) == 2
    assert any("flattened input" in note for note in report.notes)
    assert_close(out, fn(x, a, s, b))


def test_the_op_is_classified_as_a_gemm_with_its_operands():
    x, a, s, b, _ = _inputs(SHAPES[0], torch.float32)
    for fn, bias in ((lambda x, a, s, b: PHM(x, a, s, b), "b"),
                     (lambda x, a, s, b: PHM(x, a, s, bias=b), "b"),
                     (lambda x, a, s, b: PHM(x, a, s), None)):
        gm = traced(fn, x, a, s, b)
        (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
        op = classify(node)
        assert (op.kind, op.name) == ("gemm", "phm_linear")
        assert [getattr(o, "name", o) for o in op.operands] == ["x", "a", "s", bias]


def _phm_group(dtype=torch.float32):
    fn = EPILOGUES["scale_residual"]
    inputs = _inputs(SHAPES[0], dtype)
    (group,) = partition(traced(fn, *inputs).graph).groups
    return group


def test_cuda_source_is_autotuned_over_the_phm_configs(tmp_path):
    """The CUDA target cannot run here; its source is checked: a triton.autotune over
    PHM_CONFIGS (BLOCK_M/P/K, num_warps, num_stages) keyed on the row bucket and n, p, q, T."""
    import ast

    group = _phm_group()
    source = generate(group, "cuda")
    assert source.plan.template == "phm" and "autotuned over" in " ".join(source.text.split())
    fn = next(d for d in ast.parse(source.text).body
              if isinstance(d, ast.FunctionDef) and d.name == source.name)
    call = fn.decorator_list[0]
    assert [ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in fn.decorator_list] == [
        "triton.autotune", "triton.jit"]
    params = {a.arg: ast.unparse(a.annotation) if a.annotation else None for a in fn.args.args}
    kw = {k.arg: k.value for k in call.keywords}
    key = ast.literal_eval(kw["key"])
    assert key == ["M_BUCKET", "NB", "P", "Q", "T"] and all(k in params for k in key)
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        assert ast.literal_eval(kw["cache_results"]) is True
    found = []
    for c in kw["configs"].elts:
        blocks = ast.literal_eval(c.args[0])
        opts = {k.arg: ast.literal_eval(k.value) for k in c.keywords}
        found.append((blocks["BLOCK_M"], blocks["BLOCK_P"], blocks["BLOCK_K"],
                      opts["num_warps"], opts["num_stages"]))
    assert found == phm_template.PHM_CONFIGS and len(found) >= 4
    assert all(min(c[:3]) >= 16 for c in found) and any(c[0] == 16 for c in found)
    assert all(params[b] == "tl.constexpr" for b in phm_template.BLOCKS)
    assert isinstance(cache.load(source.text, source.name, tmp_path), triton.runtime.Autotuner)
    plain = generate(group, "interpreter").text
    undecorated = re.sub(r"@triton\.autotune\(\n.*?\n\)\n", "", source.text, flags=re.S)
    assert plain.split("@triton.jit", 1)[1] == undecorated.split("@triton.jit", 1)[1]


def test_a_hypercomplex_model_lowers_its_phm_ops_with_their_gelu():
    """nn.Sequential(Linear, GELU, Linear) rewritten by the hypercomplex pass (2 Kronecker
    terms, n = 4: p, q = 24, 16 and 8, 24): the first phm op and its GELU are one kernel, the
    second (the output) a bare phm kernel. Compared with the same rewritten graph run eagerly,
    so the only difference is the generated code."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval().to(DEVICE)
    x = rand(37, 64, seed=11)
    options = {"hypercomplex": {"terms": 2}}
    with torch.inference_mode():
        ref = torch.compile(model, backend="effc", options={**options, "lowering": "eager"})(x)
        torch._dynamo.reset()
        effc.reset()
        with poisoned_outputs():
            out = compile_triton(model, options)(x)
    (g,) = effc.report().graphs
    assert g.lowering == "triton" and g.fallbacks == []
    (record,) = g.passes
    assert record.name == "hypercomplex" and record.counters["rewritten"] == 2
    assert [(k.name, len(k.nodes)) for k in g.kernels] == [("phm_linear_gelu", 2),
                                                           ("phm_linear", 1)]
    assert not any("phm_linear" in ops for ops in g.eager_ops.values())
    assert_close(out, ref)


# Run where Triton compiles for a GPU (no TRITON_INTERPRET): every autotune config of the
# generated phm kernels, recorded from a CUDA-targeted lowering, compiled for sm_90.
_CUDA_CHECK = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    import cuda_compile_check as check
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    import effc.kernels.phm  # noqa: F401

    PHM = torch.ops.effc.phm_linear
    JITFunction.run = check._record
    Autotuner.run = check._record
    check.triton_lowering.unavailable_reason = lambda *a, **k: None
    check.triton_lowering.kernel_target = lambda inputs: "cuda"
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        rnd = lambda *s: torch.randn(s, generator=g).to(dtype)
        check._run(str(dtype), lambda x, a, s, b, r: torch.nn.functional.silu(PHM(x, a, s, b)) * r,
                   (rnd(5, 48), rnd(2, 4, 4), rnd(2, 24, 12), rnd(96), rnd(5, 96)), {{}}, False)
    for row in check._compiles(90):
        print(json.dumps(row), flush=True)
""")


@pytest.mark.slow
def test_generated_phm_kernels_compile_for_sm90(tmp_path):
    """The interpreter accepts more than the compiler: every config of the generated kernel,
    fp32 and bf16, must compile for the H100 and fit its shared memory."""
    pytest.importorskip("triton.backends.nvidia")
    tests = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), EFFC_CACHE_DIR=str(tmp_path / "effc"))
    done = subprocess.run([sys.executable, "-c", _CUDA_CHECK.format(tests=str(tests))], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode and "ptxas" in done.stderr:
        pytest.skip("this triton has no ptxas to compile for CUDA")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"kernel"')]
    assert not [r for r in rows if not r["ok"]], rows
    assert {r["kernel"] for r in rows} == {"phm_linear_silu_mul"}
    assert {d for r in rows for d in r["dtypes"]} >= {"*fp32", "*bf16"}
    assert len(rows) == 2 * len(phm_template.PHM_CONFIGS)
    assert all(r["shared"] <= 232448 for r in rows)  # sm_90's per-block limit (227 KiB)
