"""effc::phm_linear: the reference against the dense layer, the Triton kernel against the
reference, and the op's registration.

Kernel tests run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
without CUDA), on shapes ragged against the blocks, with fresh random inputs per case and a
NaN-poisoned output buffer so an element the kernel fails to write cannot pass.
"""

import textwrap

import pytest
import torch
import torch.nn.functional as F
from lowering_helpers import DEVICE, TORCH_ACTIVATIONS, no_tf32  # noqa: F401 (fixture)
from torch._subclasses.fake_tensor import FakeTensorMode
from helpers import cuda_check

import effc.kernels.phm as phm
from effc.kernels.low_rank import ACTIVATIONS
from effc.kernels.phm import kron_weight, phm_linear_reference, phm_linear_triton

# fp32 comparisons are tight (some exact): no TF32 in CUDA runs (a lowering_helpers fixture)
pytestmark = pytest.mark.usefixtures("no_tf32")

OP = torch.ops.effc.phm_linear
SMALL_BLOCKS = dict(block_m=16, block_p=16, block_k=16)  # the interpreter is slow; 16 is tl.dot's minimum


def make_inputs(lead, terms, n, p, q, dtype=torch.float32, bias=True, seed=0, device=DEVICE):
    """Random operands scaled so the mixed blocks and the output are O(1) with both signs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n * q, generator=g)
    a = torch.randn(terms, n, n, generator=g) / n**0.5
    s = torch.randn(terms, p, q, generator=g) / (terms * q) ** 0.5
    b = torch.randn(n * p, generator=g) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)
    return cast(x), cast(a), cast(s), cast(b)


def reference(x, a, s, b, activation="none"):
    return TORCH_ACTIVATIONS[activation](phm_linear_reference(x, a, s, b))


def fp32_oracle(x, a, s, b, activation="none"):
    """The reference evaluated in fp32 on the (already rounded) operands."""
    up = lambda t: None if t is None else t.float()
    return reference(up(x), up(a), up(s), up(b), activation)


def run_poisoned(x, a, s, b, activation="none", **kwargs):
    """Runs the kernel into a NaN-filled buffer and checks it wrote all of that buffer."""
    out = torch.full(tuple(x.shape[:-1]) + (a.shape[1] * s.shape[1],), float("nan"),
                     dtype=x.dtype, device=x.device)
    y = phm_linear_triton(x, a, s, b, activation, out=out, **kwargs)
    assert y is out
    assert not y.isnan().any(), "kernel left elements of the output unwritten"
    return y


# (T, n, p, q): T = n, T != n either way, T = 1, n in {2, 3, 4, 8}
REF_SHAPES = [(2, 2, 3, 5), (1, 3, 4, 2), (4, 3, 2, 3), (2, 4, 5, 3), (4, 4, 1, 1), (3, 8, 2, 3)]


@pytest.mark.parametrize("shape", REF_SHAPES, ids=lambda s: "T{}n{}p{}q{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", [(7,), (2, 5), (2, 1, 3)], ids=["2d", "3d", "4d"])
def test_reference_equals_dense_linear(shape, bias, lead):
    x, a, s, b = make_inputs(lead, *shape, dtype=torch.float64, bias=bias, seed=sum(shape) + len(lead))
    y = phm_linear_reference(x, a, s, b)
    assert y.shape == lead + (shape[1] * shape[2],)
    torch.testing.assert_close(y, F.linear(x, kron_weight(a, s), b), atol=1e-12, rtol=1e-12)


def test_kron_weight_is_the_sum_of_kronecker_products():
    """kron_weight is the dense oracle above: check it against torch.kron."""
    _, a, s, _ = make_inputs((1,), 3, 4, 5, 2, dtype=torch.float64, seed=1)
    dense = sum(torch.kron(a[t], s[t]) for t in range(a.shape[0]))
    assert torch.equal(kron_weight(a, s), dense)


# (M, T, n, p, q): M, p and q ragged against the 16-blocks (and M = 1), one to three blocks
# of each, T below/at/above n
KERNEL_SHAPES = [(37, 2, 3, 5, 7), (5, 4, 4, 12, 20), (1, 1, 2, 5, 7), (37, 3, 2, 12, 20),
                 (5, 2, 3, 20, 7)]
KERNEL_IDS = ["M{}T{}n{}p{}q{}".format(*s) for s in KERNEL_SHAPES]


def case_seed(shape, bias, activation):
    """A distinct, reproducible seed per parametrized case (str hashes vary between runs)."""
    return 1000 * KERNEL_SHAPES.index(shape) + 10 * ACTIVATIONS.index(activation) + 2 * bias


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_fp32_matches_reference(shape, bias, activation):
    m, *rest = shape
    x, a, s, b = make_inputs((m,), *rest, bias=bias, seed=case_seed(shape, bias, activation))
    y = run_poisoned(x, a, s, b, activation, **SMALL_BLOCKS)
    torch.testing.assert_close(y, reference(x, a, s, b, activation), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=KERNEL_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_bf16_matches_fp32_reference(shape, bias, activation):
    """Tolerance 3 eps (relative, and absolute since outputs are O(1)): the kernel rounds the
    mixed blocks to bf16 before the dot (eps/2 each; the interpreter's cast truncates, eps)
    and the output (the same), and sums in another order; measured worst case ~1.3 eps."""
    m, *rest = shape
    x, a, s, b = make_inputs((m,), *rest, dtype=torch.bfloat16, bias=bias,
                             seed=case_seed(shape, bias, activation) + 1)
    y = run_poisoned(x, a, s, b, activation, **SMALL_BLOCKS)
    assert y.dtype == torch.bfloat16
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(y.float(), fp32_oracle(x, a, s, b, activation), atol=3 * eps, rtol=3 * eps)


def test_kernel_activations_see_both_signs():
    """The activation tests mean something only if pre-activations straddle zero."""
    for shape in KERNEL_SHAPES:
        m, *rest = shape
        pre = reference(*make_inputs((m,), *rest, seed=3))
        assert (pre < -0.5).any() and (pre > 0.5).any()


@pytest.mark.parametrize("lead", [(2, 3), (2, 1, 3), ()], ids=["3d", "4d", "1d"])
def test_kernel_leading_dims_and_default_blocks(lead):
    x, a, s, b = make_inputs(lead, 2, 3, 5, 7, seed=4)
    y = run_poisoned(x, a, s, b, "silu")
    assert y.shape == lead + (15,)
    torch.testing.assert_close(y, reference(x, a, s, b, "silu"), atol=1e-5, rtol=1e-5)


def test_kernel_strided_operands():
    """Transposed and sliced operands and a strided output: every stride must be honoured."""
    x, a, s, b = make_inputs((21,), 3, 2, 12, 20, seed=5)
    xs = x.t().contiguous().t()  # stride (1, 21)
    a_s = a.transpose(1, 2).contiguous().transpose(1, 2)
    s_s = s.transpose(1, 2).contiguous().transpose(1, 2)
    b_s = torch.stack([b, b], 1).reshape(-1)[::2]  # stride 2
    assert not (xs.is_contiguous() or a_s.is_contiguous() or s_s.is_contiguous() or b_s.is_contiguous())
    expected = reference(x, a, s, b, "relu")
    buffer = torch.full((21, 48), float("nan"), device=DEVICE)
    y = phm_linear_triton(xs, a_s, s_s, b_s, "relu", out=buffer[:, ::2], **SMALL_BLOCKS)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert not y.isnan().any() and buffer[:, 1::2].isnan().all()


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["M0", "batch0"])
def test_kernel_empty_rows(lead):
    x, a, s, b = make_inputs(lead, 2, 3, 5, 7)
    y = phm_linear_triton(x, a, s, b, "gelu")
    assert y.shape == lead + (15,) and y.numel() == 0
    assert OP(x, a, s, b).shape == y.shape


@pytest.mark.parametrize("impl", [OP, phm_linear_reference, phm_linear_triton], ids=["op", "ref", "triton"])
def test_bad_arguments_raise_value_error(impl):
    x, a, s, b = make_inputs((3,), 2, 3, 5, 7)
    bad_calls = {
        "x's features": (x[:, :-1], a, s, b),
        "a not square": (x, a[:, :, :2], s, b),
        "terms": (x, a[:1], s, b),
        "s not 3-D": (x, a, s[0], b),
        "bias": (x, a, s, b[:-1]),
        "dtype": (x, a, s.double(), b),
        "bias dtype": (x, a, s, b.half()),
    }
    for what, args in bad_calls.items():
        with pytest.raises(ValueError, match="phm_linear"):
            impl(*args)
            pytest.fail(f"no error for a bad {what}")


def test_kernel_bad_options_raise_value_error():
    x, a, s, b = make_inputs((3,), 2, 3, 5, 7)
    with pytest.raises(ValueError, match=r"activation='tanh'.*'gelu_tanh'"):
        phm_linear_triton(x, a, s, b, "tanh")
    with pytest.raises(ValueError, match="out must be"):
        phm_linear_triton(x, a, s, b, out=torch.empty(3, 14, device=DEVICE))
    with pytest.raises(ValueError, match="powers of two"):
        phm_linear_triton(x, a, s, b, block_p=24)


def test_op_cpu_is_the_reference():
    for bias in (True, False):
        x, a, s, b = make_inputs((2, 5), 2, 3, 5, 7, bias=bias, seed=6, device="cpu")
        assert torch.equal(OP(x, a, s, b), phm_linear_reference(x, a, s, b))


def test_op_on_cuda_runs_the_kernel(monkeypatch):
    """The op's non-CPU dispatch, with CUDA and another device stood in for."""
    calls = []
    monkeypatch.setattr(phm, "phm_linear_triton", lambda *args: calls.append("triton"))
    monkeypatch.setattr(phm, "phm_linear_reference", lambda *args: calls.append("reference"))

    class Stand:  # the attribute the dispatch reads
        def __init__(self, device):
            self.device = torch.device(device)

    for device in ("cuda", "meta", "cuda"):
        phm._phm_linear_default(Stand(device), None, None)
    assert calls == ["triton", "reference", "triton"]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_under_torch_compile(backend):
    x, a, s, b = make_inputs((2, 5), 2, 3, 5, 7, seed=7)

    def fn(x, a, s, b):
        return torch.relu(OP(x, a, s, b)) * 2 + 1

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    expected = torch.relu(phm_linear_reference(x, a, s, b)) * 2 + 1
    torch.testing.assert_close(compiled(x, a, s, b), expected, atol=1e-5, rtol=1e-5)
    x2, *_ = make_inputs((3,), 2, 3, 5, 7, seed=8)  # another rank of x, no bias: recompiles, still right
    torch.testing.assert_close(compiled(x2, a, s, None), torch.relu(phm_linear_reference(x2, a, s, None)) * 2 + 1,
                               atol=1e-5, rtol=1e-5)


def test_op_fake_tensor_shapes():
    with FakeTensorMode():
        x, a, s = (torch.empty(4, 7, 21, dtype=torch.float16), torch.empty(2, 3, 3, dtype=torch.float16),
                   torch.empty(2, 5, 7, dtype=torch.float16))
        y = OP(x, a, s, None)
        assert y.shape == (4, 7, 15) and y.dtype == torch.float16
        assert OP(torch.empty(21, dtype=torch.float16), a, s).shape == (15,)
        with pytest.raises(ValueError, match="phm_linear"):
            OP(torch.empty(4, 20, dtype=torch.float16), a, s)


def test_op_opcheck():
    """torch.library's own consistency checks (schema, fake impl, dispatch)."""
    x, a, s, b = make_inputs((3,), 2, 3, 5, 7, seed=9)
    torch.library.opcheck(OP, (x, a, s, b))
    torch.library.opcheck(OP, (x, a, s, None))


# Run where Triton compiles for a GPU (no TRITON_INTERPRET), which needs no GPU to reach a cubin.
_CUDA_CHECK = textwrap.dedent("""
    import json, torch, triton
    from torch._library.triton import get_triton_kernels_for_op
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import effc.kernels.phm as phm

    kernel = phm._phm_linear_kernel
    result = {"found_by_triton_op": get_triton_kernels_for_op("effc::phm_linear") == [kernel],
              "compiled": []}
    for dtype, activation, has_bias, blocks in [("fp16", 2, True, (64, 64, 64)),
                                                ("bf16", 3, False, (16, 16, 16)),
                                                ("fp32", 4, True, (64, 64, 32))]:
        const = dict(HAS_BIAS=has_bias, ACTIVATION=activation, INPUT_PRECISION="ieee",
                     UPCAST_DOT=False, BLOCK_M=blocks[0], BLOCK_P=blocks[1], BLOCK_K=blocks[2])
        sig = {n: "constexpr" if n in const else "*" + dtype if n.endswith("_ptr") else "i32"
               for n in kernel.arg_names}
        done = triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 2 if dtype == "fp32" else 3})
        result["compiled"].append([dtype, done.asm["ttir"].count("tt.dot"), len(done.asm["cubin"])])
    print(json.dumps(result))
""")


@pytest.mark.slow
def test_op_kernel_compiles_for_cuda_and_triton_op_finds_it(tmp_path):
    """The interpreter accepts more than the compiler: the kernel must compile for sm_90, and
    triton_op's source scan must find it so inductor can see it."""
    result = cuda_check(_CUDA_CHECK, tmp_path)
    assert result["found_by_triton_op"]
    assert [(d, dots) for d, dots, _ in result["compiled"]] == [("fp16", 1), ("bf16", 1), ("fp32", 1)]
    assert all(size > 0 for *_, size in result["compiled"])
