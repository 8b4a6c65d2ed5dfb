"""effc::low_rank_linear: the Triton kernel against its torch reference, and the op's registration.

Kernel tests run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
without CUDA), on ragged shapes, with fresh random inputs and a NaN-poisoned output
buffer so an element the kernel fails to write cannot pass. The kernel is the text template
the Triton lowering also fills; the last tests check that the op runs it and that it compiles
for CUDA.
"""

import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lowering_helpers import DEVICE, no_tf32  # noqa: F401 (fixture)
from torch._subclasses.fake_tensor import FakeTensorMode
from helpers import cuda_check

import effc.kernels.low_rank as low_rank
from effc.kernels.low_rank import (
    ACTIVATIONS,
    MAX_FUSED_RANK,
    low_rank_linear_reference,
    low_rank_linear_triton,
)

# fp32 comparisons are tight (some exact): no TF32 in CUDA runs (a lowering_helpers fixture)
pytestmark = pytest.mark.usefixtures("no_tf32")

OP = torch.ops.effc.low_rank_linear
SMALL_BLOCKS = dict(block_m=16, block_n=16, block_k=16)  # the interpreter is slow; 16 is tl.dot's minimum


def make_inputs(x_shape, n, rank, dtype=torch.float32, bias=True, seed=0, device=DEVICE):
    """Random operands scaled so the pre-activation is O(1) with both signs."""
    g = torch.Generator().manual_seed(seed)
    k = x_shape[-1]
    x = torch.randn(x_shape, generator=g)
    v = torch.randn(rank, k, generator=g) / k**0.5
    u = torch.randn(n, rank, generator=g) / rank**0.5
    b = torch.randn(n, generator=g) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)
    return cast(x), cast(v), cast(u), cast(b)


def run_poisoned(x, v, u, b, activation="none", **kwargs):
    """Runs the kernel into a NaN-filled buffer and checks it wrote into that buffer."""
    out = torch.full(tuple(x.shape[:-1]) + (u.shape[0],), float("nan"), dtype=x.dtype,
                     device=x.device)
    y = low_rank_linear_triton(x, v, u, b, activation, out=out, **kwargs)
    assert y is out
    assert not y.isnan().any(), "kernel left elements of the output unwritten"
    return y


def fp32_oracle(x, v, u, b, activation):
    """The reference evaluated in fp32 on the (already rounded) operands."""
    up = lambda t: None if t is None else t.float()
    return low_rank_linear_reference(up(x), up(v), up(u), up(b), activation)


# (M, K, N, r): ragged against the 16-blocks, rank 1, and exact block multiples.
SHAPES = [(37, 45, 29, 11), (37, 45, 29, 1), (32, 32, 48, 16), (16, 64, 32, 32), (5, 17, 70, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}K{}N{}r{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n_split", [1, 2, 64], ids=lambda s: f"split{s}")
def test_kernel_fp32_matches_reference(shape, bias, n_split):
    m, k, n, r = shape
    x, v, u, b = make_inputs((m, k), n, r, bias=bias, seed=m + n + r)
    y = run_poisoned(x, v, u, b, "gelu", n_split=n_split, **SMALL_BLOCKS)
    torch.testing.assert_close(y, low_rank_linear_reference(x, v, u, b, "gelu"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_kernel_every_activation(activation, bias):
    x, v, u, b = make_inputs((37, 45), 29, 11, bias=bias, seed=1)
    pre = low_rank_linear_reference(x, v, u, b, "none")
    assert (pre < -0.5).any() and (pre > 0.5).any(), "inputs must exercise both sides of the activation"
    y = run_poisoned(x, v, u, b, activation, **SMALL_BLOCKS)
    torch.testing.assert_close(y, low_rank_linear_reference(x, v, u, b, activation), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("shape", [(37, 45, 29, 11), (32, 32, 32, 1)], ids=lambda s: "M{}K{}N{}r{}".format(*s))
def test_kernel_half_precision(dtype, activation, shape):
    """Tolerance 3 eps (relative, and absolute since outputs are O(1)): the kernel rounds
    the rank-r intermediate to the input dtype (eps/2 per term) and the output (eps/2),
    and sums in a different order than the oracle; the measured worst case is ~1.2 eps."""
    m, k, n, r = shape
    x, v, u, b = make_inputs((m, k), n, r, dtype=dtype, seed=7)
    y = run_poisoned(x, v, u, b, activation, **SMALL_BLOCKS)
    assert y.dtype == dtype
    eps = torch.finfo(dtype).eps
    expected = fp32_oracle(x, v, u, b, activation).to(dtype)
    torch.testing.assert_close(y.float(), expected.float(), atol=3 * eps, rtol=3 * eps)


@pytest.mark.parametrize("x_shape", [(2, 3, 45), (2, 1, 3, 45), (45,)], ids=["3d", "4d", "1d"])
def test_kernel_leading_dims(x_shape):
    x, v, u, b = make_inputs(x_shape, 29, 11, seed=3)
    y = run_poisoned(x, v, u, b, "silu", **SMALL_BLOCKS)
    assert y.shape == x_shape[:-1] + (29,)
    torch.testing.assert_close(y, low_rank_linear_reference(x, v, u, b, "silu"), atol=1e-4, rtol=1e-4)


def test_kernel_strided_operands():
    """Transposed and sliced operands: the kernel must honour every stride it is given."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(45, 37, generator=g).to(DEVICE).t()  # [37, 45], stride (1, 37)
    v = (torch.randn(45, 11, generator=g) / 7).to(DEVICE).t()  # [11, 45], column-major
    u = (torch.randn(29, 22, generator=g) / 3).to(DEVICE)[:, ::2]  # [29, 11], stride (22, 2)
    b = torch.randn(58, generator=g).to(DEVICE)[::2]  # stride 2
    assert not (x.is_contiguous() or v.is_contiguous() or u.is_contiguous() or b.is_contiguous())
    expected = low_rank_linear_reference(x.contiguous(), v.contiguous(), u.contiguous(), b.contiguous(), "relu")
    torch.testing.assert_close(run_poisoned(x, v, u, b, "relu", **SMALL_BLOCKS), expected, atol=1e-4, rtol=1e-4)
    # a strided output buffer: every other column is the output, the rest must stay untouched
    buffer = torch.full((37, 58), float("nan"), device=DEVICE)
    y = low_rank_linear_triton(x, v, u, b, "relu", out=buffer[:, ::2], **SMALL_BLOCKS)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    assert buffer[:, 1::2].isnan().all()


@pytest.mark.parametrize("x_shape", [(0, 45), (2, 0, 45)], ids=["M0", "batch0"])
def test_kernel_empty_rows(x_shape):
    x, v, u, b = make_inputs(x_shape, 29, 11)
    y = low_rank_linear_triton(x, v, u, b, "gelu")
    assert y.shape == x_shape[:-1] + (29,) and y.numel() == 0
    assert OP(x, v, u, b, "gelu").shape == y.shape


def test_kernel_default_tiling():
    """The default block choice (what CUDA would use), on a shape ragged against it."""
    x, v, u, b = make_inputs((70, 40), 67, 5, seed=11)
    y = run_poisoned(x, v, u, b, "gelu_tanh")
    torch.testing.assert_close(y, low_rank_linear_reference(x, v, u, b, "gelu_tanh"), atol=1e-4, rtol=1e-4)


class _H100:
    multi_processor_count = 132


@pytest.mark.parametrize("m,n,fused", [(1, 4096, False), (8, 4096, False), (4096, 4096, False),
                                       (16896, 4096, True), (10 ** 5, 64, True)])
def test_the_fused_kernel_runs_only_where_its_rows_fill_the_gpu(m, n, fused, monkeypatch):
    """Each column split recomputes x @ v.T: at decode sizes the fused kernel would read v
    once per split (up to 2 x 132 times on an H100), so the op and the lowering take t from a
    library GEMM there; the fused kernel needs 2 x 132 row blocks of 64 (16896 rows)."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _H100())
    assert low_rank.fused_fills_gpu(m, n, torch.device("cuda")) is fused
    assert low_rank.fused_fills_gpu(m, n, torch.device("cpu"))  # one program at a time


def test_op_on_cuda_runs_the_fused_kernel_only_where_it_fills_the_gpu(monkeypatch):
    """The op's dispatch, with CUDA tensors stood in for: which implementation each size gets."""
    calls = []
    monkeypatch.setattr(low_rank, "fused_fills_gpu", lambda m, n, device: m >= 1000)
    monkeypatch.setattr(low_rank, "low_rank_linear_triton", lambda *a: calls.append("fused"))
    monkeypatch.setattr(low_rank, "low_rank_linear_reference", lambda *a: calls.append("two"))

    class Cuda:  # the attributes the dispatch reads
        def __init__(self, *shape):
            self.shape, self.device = shape, torch.device("cuda")

        def dim(self):
            return len(self.shape)

    for rows in (1, 8, 999, 1000, 5000):
        low_rank._low_rank_linear_default(Cuda(rows, 64), Cuda(16, 64), Cuda(128, 16))
    low_rank._low_rank_linear_default(Cuda(5000, 512), Cuda(256, 512), Cuda(128, 256))  # r > 128
    assert calls == ["two", "two", "two", "fused", "fused", "two"]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 40), k=st.integers(1, 40), n=st.integers(1, 40), r=st.integers(1, 40),
    bias=st.booleans(), activation=st.sampled_from(ACTIVATIONS), n_split=st.integers(1, 3),
)
def test_kernel_random_shapes(m, k, n, r, bias, activation, n_split):
    x, v, u, b = make_inputs((m, k), n, r, bias=bias, seed=m * 7 + k)
    y = run_poisoned(x, v, u, b, activation, n_split=n_split, **SMALL_BLOCKS)
    torch.testing.assert_close(y, low_rank_linear_reference(x, v, u, b, activation), atol=1e-4, rtol=1e-4)


def test_kernel_rejects_large_rank():
    x, v, u, b = make_inputs((4, 8), 6, MAX_FUSED_RANK + 1)
    with pytest.raises(ValueError, match="ranks up to"):
        low_rank_linear_triton(x, v, u, b)
    # the op falls back to two matmuls instead
    torch.testing.assert_close(OP(x, v, u, b), low_rank_linear_reference(x, v, u, b))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_reference_equals_dense_linear(bias):
    x, v, u, b = make_inputs((3, 9, 45), 29, 11, bias=bias, seed=2)
    dense = F.linear(x, u @ v, b)
    torch.testing.assert_close(low_rank_linear_reference(x, v, u, b), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low_rank_linear_reference(x, v, u, b, "gelu"), F.gelu(dense), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_op_cpu_is_the_reference(activation):
    """On CPU tensors (also on a CUDA machine) the op is the torch reference, bit for bit."""
    for bias in (True, False):
        x, v, u, b = make_inputs((2, 5, 45), 29, 11, bias=bias, seed=4, device="cpu")
        assert torch.equal(OP(x, v, u, b, activation), low_rank_linear_reference(x, v, u, b, activation))
    x, v, u, b = make_inputs((45,), 29, 11, dtype=torch.bfloat16, seed=4, device="cpu")
    y = OP(x, v, u, b, activation)
    assert y.shape == (29,) and y.dtype == torch.bfloat16
    assert torch.equal(y, low_rank_linear_reference(x, v, u, b, activation))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_under_torch_compile(backend):
    x, v, u, b = make_inputs((2, 5, 45), 29, 11, seed=6)

    def fn(x, v, u, b):
        return OP(x, v, u, b, "gelu") * 2 + 1

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x, v, u, b), fn(x, v, u, b))
    x2, *_ = make_inputs((3, 45), 29, 11, seed=8)  # another rank of x: recompiles, still right
    assert torch.equal(compiled(x2, v, u, None), fn(x2, v, u, None))


def test_op_fake_tensor_shapes():
    with FakeTensorMode():
        x = torch.empty(4, 7, 45, dtype=torch.float16)
        v, u, b = torch.empty(11, 45, dtype=torch.float16), torch.empty(29, 11, dtype=torch.float16), None
        y = OP(x, v, u, b, "silu")
        assert y.shape == (4, 7, 29) and y.dtype == torch.float16
        assert OP(torch.empty(45, dtype=torch.float16), v, u, b).shape == (29,)
        with pytest.raises(ValueError, match="shape mismatch"):
            OP(torch.empty(4, 44, dtype=torch.float16), v, u, b)


def test_op_opcheck():
    """torch.library's own consistency checks (schema, fake impl, dispatch)."""
    x, v, u, b = make_inputs((3, 45), 29, 11, seed=9)
    torch.library.opcheck(OP, (x, v, u, b, "gelu"))
    torch.library.opcheck(OP, (x, v, u, None, "none"))


@pytest.mark.parametrize("impl", [OP, low_rank_linear_reference, low_rank_linear_triton], ids=["op", "ref", "triton"])
def test_bad_arguments_raise_value_error(impl):
    x, v, u, b = make_inputs((3, 45), 29, 11)
    with pytest.raises(ValueError, match=r"activation='tanh'.*'gelu_tanh'"):
        impl(x, v, u, b, "tanh")
    bad_calls = {
        "K": (x[:, :44], v, u, b),
        "rank": (x, v, u[:, :10], b),
        "bias": (x, v, u, b[:28]),
        "v not 2-D": (x, v[None], u, b),
        "dtype": (x, v.double(), u, b),
    }
    for what, args in bad_calls.items():
        with pytest.raises(ValueError, match="low_rank_linear"):
            impl(*args)
            pytest.fail(f"no error for a bad {what}")


def test_a_change_to_the_template_reaches_the_op_and_the_lowering(monkeypatch):
    """One source: a deliberate bug in the template's K loop (it drops the last column of K)
    shows in the op's kernel and in the lowering's fused kernel alike, as the same wrong
    result: the reference without that column."""
    from lowering_helpers import LOW_RANK, lower

    x, v, u, b = make_inputs((37, 45), 29, 11, seed=12)
    truncated = low_rank_linear_reference(x[:, :-1], v[:, :-1], u, b, "gelu")
    assert not torch.allclose(truncated, low_rank_linear_reference(x, v, u, b, "gelu"), atol=1e-3)
    broken = low_rank._X_TIMES_WT.replace("mask_k = offs_k < K\n", "mask_k = offs_k < K - 1\n")
    assert broken != low_rank._X_TIMES_WT
    monkeypatch.setattr(low_rank, "_X_TIMES_WT", broken)
    monkeypatch.setattr(low_rank, "_low_rank_linear_kernel", low_rank._op_kernel())
    op_out = run_poisoned(x, v, u, b, "gelu", **SMALL_BLOCKS)
    lowered_out, report, _, _ = lower(lambda x, v, u, b: LOW_RANK(x, v, u, b, "gelu"), x, v, u, b)
    assert [k.kind for k in report.kernels] == ["gemm"]
    for out in (op_out, lowered_out):
        torch.testing.assert_close(out, truncated, atol=1e-5, rtol=1e-5)


# Run where Triton compiles for a GPU (no TRITON_INTERPRET), which needs no GPU to reach a cubin.
_CUDA_CHECK = textwrap.dedent("""
    import json, torch, triton
    from torch._library.triton import get_triton_kernels_for_op
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import effc.kernels.low_rank as low_rank

    kernel = low_rank._low_rank_linear_kernel
    result = {"found_by_triton_op": get_triton_kernels_for_op("effc::low_rank_linear") == [kernel],
              "jit": type(kernel).__name__, "compiled": []}
    for dtype, rank, activation, has_bias in [("fp16", 16, 2, True), ("bf16", 128, 3, False),
                                              ("fp32", 128, 4, True)]:
        torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        block_m, block_k, stages = low_rank._default_tiling(256, low_rank.rank_block(rank), torch_dtype)
        const = dict(HAS_BIAS=has_bias, ACTIVATION=activation, INPUT_PRECISION="ieee",
                     UPCAST_DOT=False, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k,
                     R_PAD=low_rank.rank_block(rank))
        sig = {n: "constexpr" if n in const else "*" + dtype if n.endswith("_ptr") else "i32"
               for n in kernel.arg_names}
        done = triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": stages})
        result["compiled"].append([dtype, done.asm["ttir"].count("tt.dot"), len(done.asm["cubin"])])
    print(json.dumps(result))
""")


@pytest.mark.slow
def test_op_kernel_compiles_for_cuda_and_triton_op_finds_it(tmp_path):
    """The interpreter accepts more than the compiler: the kernel built from the template must
    compile for sm_90 with the op's tilings (both products are tl.dot), and triton_op's source
    scan must find it so inductor can see it."""
    result = cuda_check(_CUDA_CHECK, tmp_path)
    assert result["found_by_triton_op"] and result["jit"] == "JITFunction"
    assert [(d, dots) for d, dots, _ in result["compiled"]] == [("fp16", 2), ("bf16", 2), ("fp32", 2)]
    assert all(size > 0 for *_, size in result["compiled"])

