"""Generated kernels against eager, op by op and in chains, under the Triton interpreter.

Every kernel writes into NaN-poisoned outputs (an element it skips cannot pass) and must run
without an eager fallback. Shapes are ragged against every block size, inputs broadcast
([29] rows, [37, 1] columns, 0-dim) and non-contiguous; dtypes fp32, fp16 and bf16 (the
interpreter runs all three; its fp32->bf16 cast truncates, which the generated code avoids).

Tolerances, measured and justified:
- fp16/bf16: eager rounds every op's result to the dtype and so do the kernels, so outputs
  match to 1 unit in the last place: rtol = eps(dtype). atol = 1e-6 covers results that are
  zero in one and a cancellation residue (|x| * fp32 eps) in the other (the gelu tail).
- fp32, pointwise: different exp/erf/sigmoid implementations differ by a few ulp:
  rtol = 4 eps; atol = 1e-6 ~ eps * max|x| for the cancellation in gelu's tail (measured 8e-7).
- fp32, row reductions: sums of 29-45 terms in another order: atol = 2 eps * max row sum of
  |x| (measured < 0.5 of it).
- fp32, low-rank GEMM: dot products of K = 45 terms in another order than BLAS: worst case
  K * eps * sum|x v| ~ 2e-5 for these operands; rtol = atol = 1e-5 (measured <= 4e-6).
"""

import operator

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from lowering_helpers import LOW_RANK, as_tuple, lower

from effc.compiler.codegen import cache, reduction
from effc.compiler.codegen.common import FloorDiv, Rem, dim_indices, memory_order, texpr
from effc.compiler.ops import classify

EPS32 = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(*shape, dtype=torch.float32, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def check(fn, *inputs, kinds=None, atol32=1e-6, rtol32=4 * EPS32):
    """Lower `fn`, run it, compare every output with eager (values, dtype, shape, strides)."""
    out, report, gm, sources = lower(fn, *inputs)
    assert report.kernels and not report.fallbacks, report.fallbacks
    if kinds is not None:
        assert [k.kind for k in report.kernels] == kinds
    ref = fn(*inputs)
    for o, r in zip(as_tuple(out), as_tuple(ref), strict=True):
        half = r.dtype != torch.float32
        rtol = torch.finfo(r.dtype).eps if half else rtol32
        torch.testing.assert_close(o, r, rtol=rtol, atol=1e-6 if half else atol32, equal_nan=True)
        assert o.stride() == r.stride()
    check.lowered = gm
    return report, sources


UNARY = {
    "relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "exp": torch.exp,
    "rsqrt": lambda x: torch.rsqrt(x.abs() + 0.1), "sqrt": lambda x: torch.sqrt(x.abs()),
    "log": lambda x: torch.log(x.abs() + 0.1), "neg": lambda x: -x, "abs": torch.abs,
    "cos": torch.cos, "sin": torch.sin, "pow2": lambda x: x.pow(2), "pow3": lambda x: x ** 3,
    "pow_m1": lambda x: torch.pow(x.abs() + 0.1, -1), "pow_half": lambda x: x.abs().pow(0.5),
    "scalar_ops": lambda x: (1.0 - x) * 1.1 / 0.7 + 0.1 - 0.3,
    "scalar_over_tensor": lambda x: 0.7 / (x.abs() + 0.5),
    "casts": lambda x: (x * 1.1).to(torch.float16).float().to(torch.bfloat16).float(),
    "dropout_eval": lambda x: F.dropout(x * 2.0, 0.1, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(UNARY))
def test_each_pointwise_op_alone(name, dtype):
    check(UNARY[name], rand(37, 45, dtype=dtype), kinds=["pointwise"])


BROADCASTS = [((37, 45), (45,)), ((37, 45), (37, 1)), ((3, 5, 29), (5, 1)), ((29,), (3, 5, 29)),
              ((3, 5, 29), ()), ((3, 1, 29), (1, 5, 1))]


@pytest.mark.parametrize("op", [operator.add, operator.sub, operator.mul, operator.truediv])
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
def test_binary_ops_broadcast(op, shapes):
    a, b = rand(*shapes[0]), rand(*shapes[1], seed=1) + 5.0
    check(lambda x, y: op(x, y), a, b, kinds=["pointwise"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chain_with_broadcast_inputs_and_several_outputs(dtype):
    def fn(x, w, b):
        y = x * w + b
        g = F.gelu(y)
        return y, torch.sigmoid(g) * x - y / 3.0

    report, _ = check(fn, rand(3, 5, 29, dtype=dtype), rand(29, dtype=dtype, seed=1),
                      rand(3, 5, 1, dtype=dtype, seed=2), kinds=["pointwise"])
    assert report.kernels[0].outputs == ["add", "sub"]


def test_an_output_read_between_group_members_is_reordered_after_the_kernel():
    """mul, cumsum(mul), relu(mul), sigmoid: the kernel computing {mul, relu, sigmoid} must run
    before the cumsum that sat between its members."""
    def fn(x, w):
        a = x * w
        s = torch.cumsum(a, -1)
        return s, torch.relu(a).sigmoid()

    report, _ = check(fn, rand(37, 45), rand(45), atol32=1e-5)
    assert report.kernels[0].nodes == ["mul", "relu", "sigmoid"]
    order = [n.name for n in check.lowered.graph.nodes]
    assert order.index("cumsum") > order.index("fused_mul_relu_sigmoid")


def test_mixed_dtypes_promote_like_eager():
    check(lambda x, y: F.silu(x) * y + 1.0, rand(37, 45, dtype=torch.float16), rand(45))
    check(lambda x, y: (x + y).to(torch.bfloat16) * 2.0, rand(37, 45), rand(37, 1))


def test_non_contiguous_inputs_and_eager_output_layout():
    x = rand(45, 37).t()        # transposed: eager's result keeps this layout
    y = rand(37, 90)[:, ::2]    # sliced: strided reads
    check(lambda a, b: torch.relu(a) * b + a, x, y, kinds=["pointwise"])
    check(lambda a: torch.exp(a.transpose(0, 1)) * 2.0, rand(3, 37, 5))


REDUCTIONS = {
    "softmax": lambda x: torch.softmax(x, -1),
    "mean": lambda x: x.mean(-1, keepdim=True),
    "sum": lambda x: x.sum(-1, keepdim=True),
    "amax": lambda x: torch.amax(x, -1, keepdim=True),
    "layer_norm": lambda x: F.layer_norm(x, (x.shape[-1],)),
    "rms_norm": lambda x: F.rms_norm(x, (x.shape[-1],), None, 1e-6),
    "softmax_scaled": lambda x: (x * 0.125).softmax(-1) * 3.0,
    "centered": lambda x: x - x.mean(-1, keepdim=True),
}


@pytest.mark.parametrize("shape", [(37, 45), (3, 5, 29)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_each_row_reduction(name, dtype, shape):
    x = rand(*shape, dtype=dtype)
    fn = REDUCTIONS[name]
    n = shape[-1]
    traced_fn = {"layer_norm": lambda x: F.layer_norm(x, (n,)),
                 "rms_norm": lambda x: F.rms_norm(x, (n,), None, 1e-6)}.get(name, fn)
    check(traced_fn, x, kinds=["row"], atol32=2 * EPS32 * x.float().abs().sum(-1).max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_with_affine_params_and_residual(dtype):
    x, r = rand(3, 5, 29, dtype=dtype), rand(3, 5, 29, dtype=dtype, seed=1)
    w, b = rand(29, dtype=dtype, seed=2), rand(29, dtype=dtype, seed=3)
    atol = 2 * EPS32 * 29 * 8

    def residual_layernorm(x, r, w, b):  # BERT's output block: the sum is the residual stream
        h = x + r
        return h, F.layer_norm(h, (29,), w, b, 1e-5)

    report, _ = check(residual_layernorm, x, r, w, b, kinds=["row"], atol32=atol)
    assert report.kernels[0].name == "row_add_layernorm"

    def llama_rmsnorm(x, w):  # transformers' LlamaRMSNorm, as Dynamo traces it
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + 1e-6)
        return w * h.to(dtype)  # Dynamo folds x.dtype to a constant; symbolic_trace would not

    report, sources = check(llama_rmsnorm, x, w, kinds=["row"], atol32=atol)
    assert report.kernels[0].name == "row_rmsnorm"


def test_softmax_of_masked_rows_matches_eager_including_all_masked():
    x = rand(6, 45)
    x[0, 10:] = float("-inf")
    x[1, :] = float("-inf")  # eager gives NaN for a fully masked row; so must the kernel
    check(lambda a: torch.softmax(a, -1), x, kinds=["row"])


def test_reduced_and_full_outputs_of_one_row_group():
    x = rand(37, 45)
    def fn(a):
        m = a.mean(-1, keepdim=True)
        return m, (a - m) / (a.amax(-1, keepdim=True) - m)

    report, _ = check(fn, x, kinds=["row"], atol32=2 * EPS32 * x.abs().sum(-1).max().item())
    assert len(report.kernels[0].outputs) == 2


def test_rows_longer_than_one_block_run_eagerly(monkeypatch):
    monkeypatch.setattr(reduction, "MAX_BLOCK_N", 32)
    x = rand(37, 45)
    out, report, _, _ = lower(lambda a: torch.softmax(a, -1), x)
    torch.testing.assert_close(out, torch.softmax(x, -1))
    (fb,) = report.fallbacks
    assert fb.kernel == "row_softmax" and "longer than one block" in fb.reason


def _lr_inputs(shape, n=29, r=11, dtype=torch.float32):
    g = torch.Generator().manual_seed(sum(shape) + n + r)
    k = shape[-1]
    x, v = torch.randn(shape, generator=g), torch.randn(r, k, generator=g) / k ** 0.5
    u, b = torch.randn(n, r, generator=g) / r ** 0.5, torch.randn(n, generator=g) * 0.5
    return [t.to(dtype) for t in (x, v, u, b)]


EPILOGUES = {
    "plain": lambda x, v, u, b: LOW_RANK(x, v, u, b),
    "no_bias_relu": lambda x, v, u, b: torch.relu(LOW_RANK(x, v, u)),
    "gelu": lambda x, v, u, b: F.gelu(LOW_RANK(x, v, u, b)),
    "gelu_tanh_op": lambda x, v, u, b: LOW_RANK(x, v, u, b, "gelu_tanh"),
    "silu_op_then_tanh": lambda x, v, u, b: torch.tanh(LOW_RANK(x, v, u, b, "silu")),
    "swiglu": lambda x, v, u, b: F.silu(LOW_RANK(x, v, u, b)) * LOW_RANK(x, v, u),
    "scale_residual": lambda x, v, u, b: LOW_RANK(x, v, u, b) * 0.5 + x[..., :29],
    "bias_like_and_cast": lambda x, v, u, b: (LOW_RANK(x, v, u, None) + b).float() * 2.0,
    "materialized": lambda x, v, u, b: (LOW_RANK(x, v, u, b), F.gelu(LOW_RANK(x, v, u, b) * 2)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 45), (3, 5, 45)], ids=str)
@pytest.mark.parametrize("name", list(EPILOGUES))
def test_low_rank_linear_with_fused_epilogue(name, shape, dtype):
    fn = EPILOGUES[name]
    report, sources = check(lambda x, v, u, b: fn(x, v, u, b), *_lr_inputs(shape, dtype=dtype),
                            atol32=1e-5, rtol32=1e-5)
    assert report.kernels and all(k.kind == "gemm" for k in report.kernels)
    left = [n for n in check.lowered.graph.nodes if n.op.startswith("call") and classify(n)]
    assert left == []  # every epilogue node went into a GEMM kernel


def test_epilogue_names_say_what_is_fused():
    report, sources = check(lambda x, v, u, b: F.silu(LOW_RANK(x, v, u, b)) * LOW_RANK(x, v, u),
                            *_lr_inputs((37, 45)), atol32=1e-5, rtol32=1e-5)
    names = sorted(k.name for k in report.kernels)
    assert names == ["low_rank_linear", "low_rank_linear_silu_mul"]
    swiglu = next(k for k in report.kernels if k.name == "low_rank_linear_silu_mul")
    assert len(swiglu.nodes) == 3 and swiglu.outputs == [swiglu.nodes[-1]]


def test_generated_source_is_readable():
    report, sources = check(lambda x, w, b: F.gelu(x * w + b), rand(37, 45), rand(45), rand(37, 1))
    (text,) = sources.values()
    assert list(sources) == ["fused_mul_add_gelu"]
    assert "def fused_mul_add_gelu(in0, in1, in2, out0" in text
    assert "# add = add(mul, b)" in text and "tl.math.erf" in text
    assert "x1 = (xindex % 45)" in text      # the [45] row broadcast over rows
    assert "x0 = (xindex // 45)" in text     # the [37, 1] column broadcast over columns
    assert "xmask = xindex < 1665" in text   # static sizes are baked in


def test_dynamic_sizes_become_arguments_and_index_expressions_print():
    s0, s2 = sympy.Symbol("ks0", positive=True, integer=True), sympy.Symbol("ks2", positive=True,
                                                                          integer=True)
    xi = sympy.Symbol("xindex", integer=True, nonnegative=True)
    idx = dim_indices(xi, (s0, sympy.Integer(5), s2))
    assert [texpr(e) for e in idx] == ["(xindex // (5*ks2))", "((xindex // ks2) % 5)", "(xindex % ks2)"]
    assert dim_indices(xi, (sympy.Integer(1), s2)) == [0, Rem(xi, s2)]
    assert FloorDiv(sympy.Integer(17), sympy.Integer(5)) == 3


def test_memory_order_is_read_from_strides_symbolically():
    s0, s1 = sympy.symbols("s0 s1", positive=True, integer=True)
    one, five = sympy.Integer(1), sympy.Integer(5)
    assert memory_order((s0, five, s1), (5 * s1, s1, one)) == [0, 1, 2]
    assert memory_order((s0, s1), (one, s0)) == [1, 0]               # transposed
    assert memory_order((s0, one, s1), (s1, s1, one)) == [0, 1, 2]   # row-major, any size-1 stride
    assert memory_order((s0, one, s1), (one, s1, s0)) == [1, 2, 0]   # size-1 dims first
    assert memory_order((s0, s1), (2 * s1, one)) is None            # a slice: not dense


def test_kernels_are_cached_by_source_hash_in_memory_and_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFC_CACHE_DIR", str(tmp_path / "env"))
    fn, x = (lambda a: torch.tanh(a) * 2.0), rand(37, 45)
    cache.clear_memory()  # other tests may have loaded this kernel already
    before = dict(cache.STATS)
    _, report, _, sources = lower(fn, x)
    files = list((tmp_path / "env").glob("fused_tanh_mul_*.py"))
    assert len(files) == 1 and files[0].read_text() == next(iter(sources.values()))
    assert cache.STATS["writes"] == before["writes"] + 1
    lower(fn, x)  # same source: the module in memory
    assert cache.STATS["memory_hits"] == before["memory_hits"] + 1
    cache.clear_memory()
    mtime = files[0].stat().st_mtime_ns
    lower(fn, x)  # a fresh process would import the file again, not rewrite it
    assert cache.STATS["disk_hits"] == before["disk_hits"] + 1 and files[0].stat().st_mtime_ns == mtime
    _, _, _, _ = lower(fn, x, cache_dir=str(tmp_path / "option"))  # memory hit: no new file
    cache.clear_memory()
    lower(fn, x, cache_dir=str(tmp_path / "option"))
    assert len(list((tmp_path / "option").glob("fused_tanh_mul_*.py"))) == 1


def test_source_hash_ignores_comments_and_docstring_only():
    text = '"""doc naming add_7"""\nimport triton\n\n# add_7 = add(x, y)\nv0 = a0 + a1  # x\n'
    other = '"""doc naming add_9"""\nimport triton\n# add_9 = add(p, q)\n\nv0 = a0 + a1\n'
    assert cache.source_hash(text) == cache.source_hash(other)
    assert cache.source_hash(text) != cache.source_hash(text.replace("a0 + a1", "a0 - a1"))


PROGRAM_OPS = ["add", "mul", "relu", "tanh", "sigmoid", "cumsum", "mean_add", "softmax", "norm"]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(PROGRAM_OPS), st.integers(0, 99), st.integers(0, 99)),
                min_size=1, max_size=10),
       st.lists(st.integers(0, 99), min_size=1, max_size=3))
def test_random_programs_match_eager(program, returned):
    """Random mixes of fusable ops, broadcast operands and eager barriers, lowered and run."""
    def fn(x, w, c):
        values = [x, w, c]
        for op, a, b in program:
            lhs, rhs = values[a % len(values)], values[b % len(values)]
            if op in ("add", "mul"):
                values.append(lhs + rhs if op == "add" else lhs * rhs)
            elif op in ("relu", "tanh", "sigmoid"):
                values.append(getattr(torch, op)(lhs))
            elif op == "cumsum":
                values.append(torch.cumsum(lhs, -1))
            elif op == "mean_add":
                values.append(lhs - (lhs * rhs).mean(-1, keepdim=True))
            elif op == "softmax":
                values.append(torch.softmax(lhs, -1))
            else:
                values.append(F.layer_norm(lhs + rhs + x, (10,)))
        return tuple(values[3 + r % (len(values) - 3)] for r in returned)

    x, w, c = rand(6, 10, scale=1.0), rand(10, scale=1.0, seed=1), rand(6, 1, scale=1.0, seed=2)
    out, report, _, _ = lower(fn, x, w, c)
    assert not report.fallbacks
    for o, r in zip(as_tuple(out), as_tuple(fn(x, w, c)), strict=True):
        # a few fused ops, each within a few ulp of eager; cumsum and norms sum <= 10 terms
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
        assert o.shape == r.shape and o.stride() == r.stride()
