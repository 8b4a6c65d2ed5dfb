"""Generated kernels against eager, op by op and in chains, under the Triton interpreter.

Every kernel writes into NaN-poisoned outputs (an element it skips cannot pass) and must run
without an eager fallback. Shapes are ragged against every block size, inputs broadcast
([29] rows, [37, 1] columns, 0-dim) and non-contiguous; dtypes fp32, fp16 and bf16 (the
interpreter runs all three; its fp32->bf16 cast truncates, which the generated code avoids).

Tolerances, measured and justified:
- fp16/bf16: eager rounds every op's result to the dtype and so do the kernels (compiled
  without FMA contraction), so outputs match to 1 unit in the last place, of either binade
  at a power of two: rtol = 2 eps(dtype). On a GPU, Triton's fp32 division and log/exp are
  approximate (a few fp32 ulp), which rounds to that same 1 ulp (an H200 gave up to 1.34 eps
  on single ops: log, reciprocal, pow(x, -1)). atol = 1e-6 covers results that are zero in one and a
  cancellation residue (|x| * fp32 eps) in the other (the gelu tail).
- fp16/bf16 GEMMs: the dot products run in another order, the fused kernel keeps t = x @ v.T
  in fp32 where eager rounds it, and on a GPU the epilogue's sigmoid is approximate: errors
  scale with the operands, not with each output (one near zero can differ by all of itself),
  so atol = eps(dtype) * max|y| (an H200 gave at most 9e-5 in fp16 and 7e-4 in bf16, where
  this allows ~2e-3 and ~2e-2; only tanh-based epilogues exceeded atol = 1e-6).
- fp32, pointwise: different exp/erf/sigmoid implementations differ by a few ulp:
  rtol = 4 eps; atol = 1e-6 ~ eps * max|x| for the cancellation in gelu's tail (measured 8e-7).
- fp32, row reductions: sums of 29-45 terms in another order: atol = 2 eps * max row sum of
  |x| (measured < 0.5 of it).
- fp32, low-rank GEMM: dot products of K = 45 terms in another order than BLAS: worst case
  K * eps * sum|x v| ~ 2e-5 for these operands; rtol = atol = 1e-5 (measured <= 4e-6).
"""

import inspect
import operator
import re

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
import triton
from lowering_helpers import DEVICE, LOW_RANK, as_tuple, lower

from effc.compiler.lowering.codegen import cache, launch, reduction
from effc.compiler.lowering.codegen.common import FloorDiv, Rem, dim_indices, memory_order, texpr
from effc.compiler.lowering.ops import classify

EPS32 = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(*shape, dtype=torch.float32, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)


def check(fn, *inputs, kinds=None, atol32=1e-6, rtol32=4 * EPS32):
    """Lower `fn`, run it, compare every output with eager (values, dtype, shape, strides)."""
    out, report, gm, sources = lower(fn, *inputs)
    assert report.kernels and not report.fallbacks, report.fallbacks
    if kinds is not None:
        assert [k.kind for k in report.kernels] == kinds
    ref = fn(*inputs)
    gemm = any(k.kind == "gemm" for k in report.kernels)
    for o, r in zip(as_tuple(out), as_tuple(ref), strict=True):
        if r.dtype == torch.float32:
            rtol, atol = rtol32, atol32
        else:
            eps = torch.finfo(r.dtype).eps
            rtol, atol = 2 * eps, eps * r.abs().max().item() if gemm else 1e-6
        torch.testing.assert_close(o, r, rtol=rtol, atol=atol, equal_nan=True)
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
    "type_as": lambda x: (x * 1.1).type_as(x.half()).float(),
    "dropout_eval": lambda x: F.dropout(x * 2.0, 0.1, False),
    "clamp": lambda x: torch.clamp(x, -0.5, 1.5), "clamp_min_method": lambda x: x.clamp_min(0.1),
    "clamp_max_kw": lambda x: torch.clamp(x, max=0.3), "clip": lambda x: x.clip(-1.0, 1.0),
    "clamp_min_above_max": lambda x: x.clamp(1.0, -1.0),  # torch: every element is max
    "relu6": F.relu6, "hardtanh": lambda x: F.hardtanh(x, -0.7, 0.9),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2), "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid, "erf": torch.erf, "square": torch.square,
    "reciprocal": lambda x: torch.reciprocal(x.abs() + 0.1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(UNARY))
def test_each_pointwise_op_alone(name, dtype):
    check(UNARY[name], rand(37, 45, dtype=dtype), kinds=["pointwise"])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_numbers_in_pointwise_ops_round_as_eager_does_on_the_device(device):
    """In fp16, CUDA eager computes `x / 0.7` as x * fp32(1 / fp32(0.7)) and `x + 0.1` with 0.1
    in fp32; the CPU divides, and rounds 0.1 to fp16 first. Either difference changes the last
    bit of some outputs, which a later cancellation makes large (an H200 showed 18 of 1,665
    elements of `scalar_ops` off, exactly the elements the fp32 0.1 and 0.3 account for), so
    the lowered op follows the device of its node."""
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from effc.compiler.lowering.codegen.common import expr

    gm = fx.symbolic_trace(lambda x: x / 0.7 + 0.1)
    with FakeTensorMode():
        fake = torch.empty(37, 45, dtype=torch.float16, device=device)
    for node in gm.graph.nodes:
        node.meta["val"] = fake
    div, add = (classify(n) for n in gm.graph.nodes if n.op == "call_function")
    inverse = (torch.tensor(1.0) / torch.tensor(0.7)).item()
    assert (div.name, div.operands[1]) == (("mul", inverse) if device == "cuda" else ("div", 0.7))
    x = torch.linspace(1, 2, 4097)
    assert (x * inverse != x / 0.7).any()  # the two roundings really differ
    number = torch.tensor(0.1, dtype=torch.float32 if device == "cuda" else torch.float16).item()
    assert expr(add, ["t", 0.1], torch.float16) == f"t + {number!r}"


@pytest.mark.parametrize("name", ["clamp", "clamp_min_method", "relu6", "hardtanh",
                                  "leaky_relu", "hardswish", "hardsigmoid", "relu", "square"])
def test_nan_and_inf_come_out_as_in_eager(name):
    x = rand(37, 45)
    x[::3, ::2] = float("nan")
    x[1::3, ::5] = float("inf")
    x[2::3, ::7] = float("-inf")
    check(UNARY[name], x, kinds=["pointwise"])


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


@pytest.mark.parametrize("max_block_n", [None, 32], ids=["persistent", "looped"])
def test_row_outputs_keep_eager_permuted_layout(max_block_n, monkeypatch):
    """Whisper's encoder: a conv output transposed to [B, T, C] plus positions, then LayerNorm.
    Eager's sum keeps the transposed layout (the row is strided in memory); so do the kernel's
    outputs. Sequence-first rows (row dims swapped, the row itself contiguous) likewise."""
    if max_block_n:
        monkeypatch.setattr(reduction, "MAX_BLOCK_N", max_block_n)
    conv, pos = rand(3, 45, 7), rand(7, 45, seed=1)  # [B, C, T] and [T, C]

    def whisper(c, p):
        h = c.permute(0, 2, 1) + p
        return h, F.layer_norm(h, (45,)), h.mean(-1, keepdim=True)

    assert whisper(conv, pos)[0].stride() == (315, 1, 7)  # the layouts under test
    check(whisper, conv, pos, kinds=["row"], atol32=2 * EPS32 * 45 * 8)

    def seq_first(x):
        h = x.transpose(0, 1) * 2.0
        return h, torch.softmax(h, -1)

    x = rand(7, 3, 45)
    assert seq_first(x)[0].stride() == (45, 135, 1)
    check(seq_first, x, kinds=["row"])


def _all_launchers(gm):
    return [n.target for n in gm.graph.nodes if isinstance(n.target, launch.Launcher)]


@pytest.mark.parametrize("kind", ["pointwise", "row", "gemm"])
def test_inputs_a_kernel_was_not_generated_for_run_eagerly_that_call_only(kind):
    """A launch checks runtime sizes once; inputs that do not fit run the eager subgraph for
    that call (reported, not marked broken), and the next fitting call launches again."""
    x, w, u = rand(7, 45), rand(45, seed=1), rand(13, 5, seed=2)
    fn = {"pointwise": lambda a, b: torch.sigmoid(a) * b,
          "row": lambda a, b: F.layer_norm(a + 1.0, (45,), b),
          "gemm": lambda a, v: torch.relu(LOW_RANK(a, v, u, None))}[kind]
    inputs = (x, w) if kind != "gemm" else (x, rand(5, 45, seed=3))
    _, report, gm, _ = lower(fn, *inputs)
    (launcher,) = _all_launchers(gm)
    bigger = (rand(9, 45, seed=4), inputs[1])  # 9 rows: the kernel was generated for 7
    with torch.no_grad():
        torch.testing.assert_close(gm(*bigger), fn(*bigger), rtol=0, atol=0)
        assert launcher.broken is None and launcher.launches == 1
        (fb,) = report.fallbacks
        assert fb.reason.startswith("at run time: ") and "is 9 at run time" in fb.reason
        gm(*inputs)
    assert launcher.launches == 2


@given(st.lists(st.lists(st.integers(0, 3), max_size=4), min_size=1, max_size=3))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_launch_broadcast_agrees_with_torch(shapes):
    try:
        expected = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        with pytest.raises(launch.Unfit, match="do not broadcast"):
            launch.broadcast(*shapes)
        return
    assert launch.broadcast(*shapes) == expected


def _launchers(gm):
    return [m for m in (n.target for n in gm.graph.nodes) if isinstance(m, reduction.RowLauncher)]


LOOPED_SHAPES = [(37, 45), (3, 5, 77)]  # ragged against BLOCK_N = 32: 2 and 3 chunks


@pytest.mark.parametrize("shape", LOOPED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_each_row_reduction_looped_over_chunks(name, dtype, shape, monkeypatch):
    """Rows longer than MAX_BLOCK_N: one pass per statistic over BLOCK_N chunks."""
    monkeypatch.setattr(reduction, "MAX_BLOCK_N", 32)
    x = rand(*shape, dtype=dtype)
    n = shape[-1]
    traced_fn = {"layer_norm": lambda x: F.layer_norm(x, (n,)),
                 "rms_norm": lambda x: F.rms_norm(x, (n,), None, 1e-6)}.get(name, REDUCTIONS[name])
    report, sources = check(traced_fn, x, kinds=["row"],
                            atol32=2 * EPS32 * x.float().abs().sum(-1).max().item())
    (text,) = sources.values()
    assert "for c0 in range(0, " in text and text.count("@triton.jit\ndef row_") == 1
    assert [k.last_variant for k in _launchers(check.lowered)] == ["looped"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_looped_norm_chain_with_affine_params_residual_and_reduced_outputs(dtype, monkeypatch):
    """A prologue (residual add), two row ops in a row (the second reads the first's output,
    recomputed in each of its passes), affine params, and reduced and full outputs."""
    monkeypatch.setattr(reduction, "MAX_BLOCK_N", 32)
    x, r = rand(5, 7, 77, dtype=dtype), rand(5, 7, 77, dtype=dtype, seed=1)
    w, b = rand(77, dtype=dtype, seed=2), rand(77, dtype=dtype, seed=3)

    def fn(x, r, w, b):
        h = x + r
        y = F.layer_norm(h, (77,), w, b, 1e-5)
        p = torch.softmax(y * 0.5, -1)
        return h, p, p.amax(-1, keepdim=True) - y.mean(-1, keepdim=True)

    report, sources = check(fn, x, r, w, b, kinds=["row"], atol32=2 * EPS32 * 77 * 16)
    assert len(report.kernels[0].outputs) == 3
    assert list(sources.values())[0].count("for c0 in range(0, 77, BLOCK_N):") >= 6


def test_looped_softmax_of_masked_rows_including_a_masked_first_chunk(monkeypatch):
    monkeypatch.setattr(reduction, "MAX_BLOCK_N", 32)
    x = rand(6, 77)
    x[0, :40] = float("-inf")  # the first chunk has no finite value; later ones do
    x[1, :] = float("-inf")    # eager gives NaN for a fully masked row; so must the kernel
    _, sources = check(lambda a: torch.softmax(a, -1), x, kinds=["row"])
    # online softmax: the max and the denominator in one pass, the output in a second
    assert list(sources.values())[0].count("for c0 in range(") == 2


def test_vocabulary_sized_softmax_runs_the_looped_kernel_at_the_real_block_limit():
    """An LM head's softmax over 50257 tokens: longer than any one block (MAX_BLOCK_N)."""
    x = rand(3, 50257)
    assert reduction.next_pow2(50257) > reduction.MAX_BLOCK_N
    report, _ = check(lambda a: torch.softmax(a * 0.7, -1), x, kinds=["row"],
                      atol32=1e-6, rtol32=1e-4)
    assert [k.last_variant for k in _launchers(check.lowered)] == ["looped"]


def _lr_inputs(shape, n=29, r=11, dtype=torch.float32):
    g = torch.Generator().manual_seed(sum(shape) + n + r)
    k = shape[-1]
    x, v = torch.randn(shape, generator=g), torch.randn(r, k, generator=g) / k ** 0.5
    u, b = torch.randn(n, r, generator=g) / r ** 0.5, torch.randn(n, generator=g) * 0.5
    return [t.to(dtype=dtype, device=DEVICE) for t in (x, v, u, b)]


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


@pytest.mark.parametrize("variant", ["fused", "two_step"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 45), (3, 5, 45)], ids=str)
@pytest.mark.parametrize("name", list(EPILOGUES))
def test_low_rank_linear_with_fused_epilogue(name, shape, dtype, variant, monkeypatch):
    """Both kernels of a low-rank group: `fused` keeps x @ v.T in registers (rows that fill a
    GPU); `two_step` takes it from a library GEMM and runs the dense template over u (fewer
    rows, e.g. decoding: the fused kernel would re-read v once per column split)."""
    from effc.compiler.lowering.codegen import templates

    monkeypatch.setattr(templates, "fused_fills_gpu", lambda *args: variant == "fused")
    fn = EPILOGUES[name]
    report, sources = check(lambda x, v, u, b: fn(x, v, u, b), *_lr_inputs(shape, dtype=dtype),
                            atol32=1e-5, rtol32=1e-5)
    assert report.kernels and all(k.kind == "gemm" for k in report.kernels)
    left = [n for n in check.lowered.graph.nodes if n.op.startswith("call") and classify(n)]
    assert left == []  # every epilogue node went into a GEMM kernel
    launchers = [t for t in _all_launchers(check.lowered) if t.plan.template == "low_rank"]
    assert launchers and {t.last_variant for t in launchers} == {variant}


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


# --- dense linear: the GEMM template with the same epilogue slot ------------------------------
# Tolerances as for the low-rank GEMM: fp32 dot products of K = 45 terms summed in another
# order than BLAS: rtol = atol = 1e-5 (measured: at most 10% of it used); fp16/bf16 accumulate
# in fp32 and round once where eager rounds, so within 1 ulp: rtol = eps(dtype) (measured: at
# most 80% of it used, i.e. some results differ by one ulp).

def _dense_inputs(shape, n=29, dtype=torch.float32):
    g = torch.Generator().manual_seed(sum(shape) + n)
    k = shape[-1]
    x, w = torch.randn(shape, generator=g), torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) * 0.5
    return [t.to(dtype=dtype, device=DEVICE) for t in (x, w, b)]


DENSE_EPILOGUES = {
    "bias_relu": lambda x, w, b: torch.relu(F.linear(x, w, b)),
    "no_bias_gelu": lambda x, w, b: F.gelu(F.linear(x, w)),
    "gelu_tanh": lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"),
    "silu_then_tanh": lambda x, w, b: torch.tanh(F.silu(F.linear(x, w, b))),
    "gating_mul": lambda x, w, b: F.silu(F.linear(x, w, b)) * F.linear(x, w),
    "scale_residual": lambda x, w, b: F.linear(x, w, b) * 0.5 + x[..., :29],
    "bias_like_and_cast": lambda x, w, b: (F.linear(x, w) + b).float() * 2.0,
    # the linear's own output is returned too: stored by the kernel besides the epilogue's
    "materialized": lambda x, w, b: (lambda y: (y, F.gelu(y * 2)))(F.linear(x, w, b)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 45), (3, 5, 45)], ids=str)
@pytest.mark.parametrize("name", list(DENSE_EPILOGUES))
def test_dense_linear_with_fused_epilogue(name, shape, dtype):
    fn = DENSE_EPILOGUES[name]
    report, sources = check(fn, *_dense_inputs(shape, dtype=dtype), atol32=1e-5, rtol32=1e-5)
    gemm = [k for k in report.kernels if k.kind == "gemm"]
    assert gemm and all(k.name.startswith("linear_") and len(k.nodes) > 1 for k in gemm)
    left = [n for n in check.lowered.graph.nodes if n.op.startswith("call") and classify(n)]
    # every epilogue node went into a GEMM kernel; only a linear with nothing to fuse is left
    # (the second linear of the gating product, whose `mul` the first one's kernel computes)
    assert all(classify(n).name == "linear" for n in left)
    assert len(left) == (1 if name == "gating_mul" else 0)


def test_dense_template_visits_every_tile_in_its_grouped_order():
    """Tiles go in groups of 8 row blocks: 10 row blocks (32 rows each under the interpreter)
    make a full group and a ragged one of 2, over 3 column blocks (the last ragged too)."""
    from effc.compiler.lowering.codegen.templates import INTERPRETER_CONFIG

    rows = 9 * INTERPRETER_CONFIG["BLOCK_M"] + 5
    x, w, b = _dense_inputs((rows, 45), n=70)
    report, _ = check(lambda x, w, b: torch.relu(F.linear(x, w, b)), x, w, b, atol32=1e-5,
                      rtol32=1e-5)
    assert [k.name for k in report.kernels] == ["linear_relu"]


def test_dense_linear_reads_strided_weights_and_inputs():
    x = rand(45, 74).t()[::2]                  # [37, 45] with strides (2, 74)
    w = rand(45, 29, scale=0.15, seed=1).t()   # [29, 45] with strides (1, 29)
    b = rand(29, seed=2)
    report, _ = check(lambda x, w, b: F.silu(F.linear(x, w, b)), x, w, b, atol32=1e-5, rtol32=1e-5)
    assert [k.name for k in report.kernels] == ["linear_silu"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(3, 7), (2, 3, 7)], ids=str)
def test_gemm_outputs_keep_eager_permuted_layout(lead, dtype):
    """Whisper's encoder layers in fp16: `residual + fc2(h)` with a channels-first residual
    takes the residual's layout in eager; the kernel stores each output row through its
    leading-dim indices and strides, for a low-rank and a dense GEMM."""
    x, w, b = _dense_inputs((*lead, 45), dtype=dtype)
    dims = list(range(len(lead) + 1))
    r = rand(lead[0], 29, *lead[1:], dtype=dtype, seed=5).permute(0, *dims[2:], 1)
    v, u = rand(8, 45, dtype=dtype, seed=6), rand(29, 8, dtype=dtype, seed=7) * 0.3

    def dense(x, w, b, r):
        h = r + F.linear(x, w, b)
        return h, F.gelu(h) * 2.0

    def low_rank(x, v, u, b, r):
        return r + LOW_RANK(x, v, u, b)

    assert dense(x, w, b, r)[0].stride()[-1] != 1  # eager's layout: what is under test
    for fn, args in ((dense, (x, w, b, r)), (low_rank, (x, v, u, b, r))):
        report, sources = check(fn, *args, kinds=["gemm"], atol32=1e-5, rtol32=1e-5)
        assert "in eager's layout" in next(iter(sources.values()))


MATMUL_SPELLINGS = {
    "falcon_x_at_wt": lambda x, w, b: F.gelu(x @ w.T + b),            # FalconLinear
    "matmul_kn_weight": lambda x, w, b: torch.relu(torch.matmul(x, w.t().contiguous())) * 2.0,
    "activations": lambda x, w, b: torch.tanh(x @ x.flatten(0, -2)[:29].transpose(0, 1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 45), (3, 5, 45)], ids=str)
@pytest.mark.parametrize("name", list(MATMUL_SPELLINGS))
def test_x_at_a_2d_matrix_is_the_dense_template_with_its_epilogue(name, shape, dtype):
    """`x @ B` with B [K, N]: the template reads B^T through B's strides, whatever B's layout."""
    report, sources = check(MATMUL_SPELLINGS[name], *_dense_inputs(shape, dtype=dtype),
                            atol32=1e-5, rtol32=1e-5)
    (gemm,) = [k for k in report.kernels if k.kind == "gemm"]
    assert gemm.name.startswith("linear_") and len(gemm.nodes) > 1
    assert "stored [K, N], read transposed" in sources[gemm.file.removesuffix(".py")]


def test_a_bare_matmul_and_a_batched_one_stay_library_calls():
    x, w, _ = _dense_inputs((3, 5, 45))
    out, report, _, _ = lower(lambda x, w: (x @ w.T, torch.relu(x @ x.transpose(1, 2))), x, w)
    assert [k.kind for k in report.kernels] == ["pointwise"]  # the relu; no 3-D B template
    torch.testing.assert_close(out[0], x @ w.T, rtol=0, atol=0)


def test_a_bare_dense_linear_stays_a_library_call():
    out, report, gm, sources = lower(lambda x, w, b: F.linear(x, w, b), *_dense_inputs((37, 45)))
    assert report.kernels == [] and report.fallbacks == [] and sources == {}
    torch.testing.assert_close(out, F.linear(*_dense_inputs((37, 45))), rtol=0, atol=0)


def _gemm_launcher(gm):
    from effc.compiler.lowering.codegen.templates import GemmLauncher

    return next(n.target for n in gm.graph.nodes if isinstance(n.target, GemmLauncher))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="about the interpreter's tiling; CUDA autotunes")
@pytest.mark.parametrize("template", ["dense", "low_rank"])
def test_interpreter_runs_one_fixed_tile_config(template):
    from effc.compiler.lowering.codegen.templates import INTERPRETER_CONFIG

    if template == "dense":
        fn, inputs = DENSE_EPILOGUES["bias_relu"], _dense_inputs((37, 45))
    else:
        fn, inputs = EPILOGUES["gelu"], _lr_inputs((37, 45))
    _, sources = check(fn, *inputs, atol32=1e-5, rtol32=1e-5)
    (text,) = sources.values()
    assert "autotune" not in text and "fixed config for the interpreter" in " ".join(text.split())
    launcher = _gemm_launcher(check.lowered)
    assert launcher.launches == 1 and launcher.last_config == INTERPRETER_CONFIG
    # 37 rows, 29 columns, K = 45: every dimension ends in a partly masked block
    assert all(37 % INTERPRETER_CONFIG["BLOCK_M"] and 45 % INTERPRETER_CONFIG["BLOCK_K"]
               and INTERPRETER_CONFIG[b] > 0 for b in INTERPRETER_CONFIG)


def _autotune_call(tree, kernel):
    import ast

    fn = next(d for d in tree.body if isinstance(d, ast.FunctionDef) and d.name == kernel)
    names = [ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in fn.decorator_list]
    assert names == ["triton.autotune", "triton.jit"]  # autotune wraps the jit function
    params = {a.arg: ast.unparse(a.annotation) if a.annotation else None for a in fn.args.args}
    return fn.decorator_list[0], params


def test_autotuning_buckets_row_counts_by_powers_of_two():
    from effc.compiler.lowering.codegen.templates import m_bucket

    assert [m_bucket(m) for m in (0, 1, 2, 3, 5, 8, 9, 300, 4096, 4097, 10 ** 6)] == [
        1, 1, 2, 4, 8, 8, 16, 512, 4096, 4096, 4096]


@pytest.mark.parametrize("template", ["dense", "low_rank"])
def test_cuda_source_is_autotuned_over_a_config_list(template, tmp_path):
    """The CUDA target cannot run here; its source is checked: a triton.autotune over configs
    that set BLOCK_M/N/K, num_warps and num_stages, keyed on the problem sizes."""
    import ast

    from effc.compiler.lowering.codegen import generate
    from effc.compiler.lowering.codegen.templates import DENSE_CONFIGS, LOW_RANK_CONFIGS
    from effc.compiler.lowering.partition import partition
    from lowering_helpers import traced

    if template == "dense":
        fn, inputs, configs = DENSE_EPILOGUES["bias_relu"], _dense_inputs((37, 45)), DENSE_CONFIGS
    else:
        fn, inputs, configs = EPILOGUES["gelu"], _lr_inputs((37, 45)), LOW_RANK_CONFIGS
    (group,) = [g for g in partition(traced(fn, *inputs).graph).groups if g.kind == "gemm"]
    source = generate(group, "cuda")
    assert source.plan.target == "cuda" and "autotuned over" in " ".join(source.text.split())
    call, params = _autotune_call(ast.parse(source.text), source.name)
    kw = {k.arg: k.value for k in call.keywords}
    key = ast.literal_eval(kw["key"])
    assert key == (["M_BUCKET", "N", "K"] if template == "dense" else ["M_BUCKET", "N", "K", "R"])
    assert all(k in params for k in key)
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        assert ast.literal_eval(kw["cache_results"]) is True
    found = []
    for c in kw["configs"].elts:
        assert ast.unparse(c.func) == "triton.Config"
        blocks = ast.literal_eval(c.args[0])
        opts = {k.arg: ast.literal_eval(k.value) for k in c.keywords}
        found.append((blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"],
                      opts["num_warps"], opts["num_stages"]))
    assert found == configs and len(found) >= 4
    assert all(bm >= 16 and bn >= 16 and bk >= 16 for bm, bn, bk, _, _ in found)  # tl.dot minimum
    assert any(bm == 16 for bm, *_ in found)  # a decode-shaped (GEMV-like) tile
    assert all(params[b] == "tl.constexpr" for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    # it is valid Triton: importing it gives the Autotuner that launches on a GPU
    assert isinstance(cache.load(source.text, source.name, tmp_path), triton.runtime.Autotuner)
    # the interpreter source for the same group differs only by the decorators
    plain = generate(group, "interpreter").text
    undecorated = re.sub(r"@triton\.autotune\(\n.*?\n\)\n", "", source.text, flags=re.S)
    assert "triton.autotune" not in plain and "triton.autotune" not in undecorated
    assert plain.split("@triton.jit", 1)[1] == undecorated.split("@triton.jit", 1)[1]
    if template == "low_rank":  # and the two-step kernel: the dense template, its own configs
        two_step, _ = _autotune_call(ast.parse(source.text), source.plan.two_step)
        assert len(two_step.keywords[0].value.elts) == len(DENSE_CONFIGS)


# --- cat: each operand computed in its own index range, picked per lane ----------------------
def _rotate_half(x):
    """Llama's rotary embedding, as Hugging Face writes it."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


CATS = {
    "last": (lambda a, b: torch.cat((a, b), -1) * 2.0, [(3, 5, 7), (3, 5, 4)]),
    "middle": (lambda a, b: torch.cat([a, b], dim=1) + 1.0, [(3, 5, 7), (3, 2, 7)]),
    "first": (lambda a, b: torch.concat((a, b)).exp(), [(3, 5, 7), (6, 5, 7)]),
    "three_ragged": (lambda a, b, c: torch.cat((a, b, c), -2).sigmoid(),
                     [(4, 3, 29), (4, 1, 29), (4, 5, 29)]),
    "computed": (lambda a, b: torch.cat((-a[:, 6:], torch.relu(b) * 0.5), 1) - a,
                 [(37, 12), (37, 6)]),
    "broadcast_in_operand": (lambda a, w, b: torch.cat((a * w + 1.0, b), -1) * w.sum(),
                             [(37, 13), (13,), (37, 32)]),
    "nested": (lambda a, b, c: torch.cat((torch.cat((a, b), 0), c), 1).tanh(),
               [(2, 3), (5, 3), (7, 4)]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CATS))
def test_cat_fuses_with_its_operands_and_users(name, dtype):
    fn, shapes = CATS[name]
    inputs = [rand(*s, dtype=dtype, seed=i) for i, s in enumerate(shapes)]
    report, _ = check(fn, *inputs, kinds=["pointwise"])  # operands' producers pulled in
    assert not any(n.target in (torch.cat, torch.concat) for n in check.lowered.graph.nodes)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_embedding_is_one_kernel(dtype):
    """q * cos + rotate_half(q) * sin, with cos/sin broadcast over batch and heads, q a
    transposed view as in attention: one kernel, the slices read in their operand's range."""
    def rope(q, cos, sin):
        return q * cos + _rotate_half(q) * sin

    q = rand(2, 9, 4, 8, dtype=dtype).transpose(1, 2)
    cos, sin = rand(1, 1, 9, 8, dtype=dtype, seed=1), rand(1, 1, 9, 8, dtype=dtype, seed=2)
    report, sources = check(rope, q, cos, sin, kinds=["pointwise"])
    (k,) = report.kernels
    assert k.name == "fused_mul_neg_cat_mul_add" and k.outputs == ["add"]
    text = sources[k.name]
    assert "c1_mask = xmask & (x3 < 4)" in text and "c2_x3 = x3 - 4" in text
    assert "tl.where(x3 < 4, " in text


def test_cat_operand_used_elsewhere_is_an_input_read_in_its_range():
    def fn(a, b):
        n = torch.neg(a)
        return torch.cat((n, b), -1) * 2.0, n.exp()

    report, _ = check(fn, rand(37, 5), rand(37, 6))
    assert sorted(k.nodes for k in report.kernels) == [["cat", "mul"], ["neg", "exp"]]


def test_cat_with_an_empty_operand():
    """A size-0 operand along the cat dim stays eager; a KV cache's first `cat([tensor([]), k])`
    (a legacy 1-d empty operand, which torch.cat skips) is a copy of k, fused with its users."""
    fn = lambda a, b: torch.cat([a, b], -2) * 2.0  # noqa: E731
    out, report, gm, _ = lower(fn, rand(2, 0, 8), rand(2, 5, 8))
    torch.testing.assert_close(out, fn(rand(2, 0, 8), rand(2, 5, 8)))
    assert [k.name for k in report.kernels] == ["fused_mul"]
    empty = torch.tensor([], device=DEVICE)
    out, report, gm, _ = lower(fn, empty, rand(5, 8))
    torch.testing.assert_close(out, fn(empty, rand(5, 8)), rtol=0, atol=0)
    assert [k.name for k in report.kernels] == ["fused_cat_mul"] and not report.fallbacks
    assert report.notes == ["legacy empty operands dropped from 1 cat: cat"]
    cat = lambda a, b: torch.cat([a, b], -2)  # noqa: E731
    out, report, gm, _ = lower(cat, empty.double(), rand(5, 8).half())  # the empty one promotes
    assert out.dtype == torch.float64 and report.notes == [] and report.kernels == []
