"""effc::shift_linear: the reference against a naive decode, the two Triton kernels (exponent-add
"shift" and decode-to-dot "dot") against the reference, and the op's registration.

Kernel tests run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
without CUDA), on shapes ragged against the blocks (odd K, so the last byte's high nibble is
padding, filled with random bits here), with fresh seeded inputs per case and a NaN-poisoned
output buffer so an element a kernel fails to write cannot pass.
"""

import itertools
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from lowering_helpers import DEVICE, TORCH_ACTIVATIONS, no_tf32  # noqa: F401 (fixture)
from torch._subclasses.fake_tensor import FakeTensorMode
from helpers import cuda_check

import effc.kernels.shift as shift
from effc.kernels.low_rank import ACTIVATIONS
from effc.kernels.shift import code_values, decode_weight, shift_linear_reference, shift_linear_triton

# fp32 comparisons are tight (some exact): no TF32 in CUDA runs (a lowering_helpers fixture)
pytestmark = pytest.mark.usefixtures("no_tf32")

OP = torch.ops.effc.shift_linear


def n_groups(k, group):
    return math.ceil(k / group) if group > 0 else 1


def make_inputs(lead, n_out, k, terms, group, dtype=torch.float32, bias=True, seed=0,
                device=DEVICE):
    """Random x, all 256 byte values as codes (padding nibbles included), signed scales sized so
    the output is O(1) with both signs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    codes = torch.randint(0, 256, (terms, n_out, math.ceil(k / 2)), generator=g, dtype=torch.uint8)
    sign = torch.randint(0, 2, (n_out, n_groups(k, group)), generator=g) * 2 - 1
    scale = (torch.rand(n_out, n_groups(k, group), generator=g) + 0.5) * sign / max(k, 1) ** 0.5
    b = torch.randn(n_out, generator=g) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)
    return cast(x), codes.to(device), scale.to(device), cast(b)


def make_dyadic(lead, n_out, k, terms, group, bias=True, seed=0, device=DEVICE):
    """Inputs on which the fp32 math is exact: x small integers / 8 (both signs), scales
    +-powers of two, bias quarters; products are then dyadic with few bits, so no sum rounds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-16, 17, (*lead, k), generator=g).float() / 8
    codes = torch.randint(0, 256, (terms, n_out, math.ceil(k / 2)), generator=g, dtype=torch.uint8)
    shape = (n_out, n_groups(k, group))
    scale = torch.exp2(torch.randint(-3, 3, shape, generator=g).float()) * \
        (torch.randint(0, 2, shape, generator=g) * 2 - 1)
    b = torch.randint(-8, 9, (n_out,), generator=g).float() / 4 if bias else None
    x[..., 0] = 0.0  # zeros and negative scales in every case
    scale[0] = -scale[0].abs()
    return x.to(device), codes.to(device), scale.to(device), None if b is None else b.to(device)


def naive_weight(codes, scale, group, n):
    """W element by element in Python floats, straight from the format's definition."""
    terms, m, _ = codes.shape
    w = torch.zeros(m, n, dtype=torch.float64)
    for o in range(m):
        for i in range(n):
            total = 0.0
            for t in range(terms):
                byte = int(codes[t, o, i // 2])
                code = byte & 15 if i % 2 == 0 else byte >> 4
                e, sign = code & 7, -1.0 if code & 8 else 1.0
                total += 0.0 if e == 7 else sign * 2.0 ** -e
            w[o, i] = float(scale[o, i // group if group > 0 else 0]) * total
    return w


def reference(x, codes, scale, b, group, activation="none"):
    return TORCH_ACTIVATIONS[activation](shift_linear_reference(x, codes, scale, b, group))


def run_poisoned(x, codes, scale, b, group, activation="none", **kwargs):
    """Runs a kernel into a NaN-filled buffer and checks it wrote all of that buffer."""
    out = torch.full(tuple(x.shape[:-1]) + (codes.shape[1],), float("nan"), dtype=x.dtype,
                     device=x.device)
    y = shift_linear_triton(x, codes, scale, b, group, activation, out=out, **kwargs)
    assert y is out
    assert not y.isnan().any(), "kernel left elements of the output unwritten"
    return y


@pytest.mark.parametrize("terms", [1, 2, 3])
@pytest.mark.parametrize("n", [7, 8], ids=["odd_n", "even_n"])
@pytest.mark.parametrize("group", [0, 3])
def test_reference_decode_equals_naive_decode(terms, n, group):
    x, codes, scale, b = make_inputs((2, 3), 5, n, terms, group, seed=10 * terms + n + group,
                                     device="cpu")
    w = naive_weight(codes, scale, group, n)  # exact: the sum has few bits, fp64 holds the product
    # the reference decodes in fp32: its weight is the exact one, rounded once to fp32
    assert torch.equal(decode_weight(codes, scale, group, n, torch.float32), w.float())
    assert torch.equal(decode_weight(codes, scale, group, n, torch.float64), w.float().double())
    torch.testing.assert_close(shift_linear_reference(x, codes, scale, b, group),
                               F.linear(x, w.float(), b), atol=1e-6, rtol=1e-6)
    assert torch.equal(OP(x, codes, scale, b, group), shift_linear_reference(x, codes, scale, b, group))


# (M, N, K) ragged against every block (M = 1 too; K odd: padding nibble), and per case a T,
# group, bias and activation such that each variant sees every (T, group) pair
SHAPES = list(itertools.product([1, 5, 37], [5, 24], [7, 33]))
CASES = [(m, n, k, 1 + i % 3, (0, 4, 5)[i // 3 % 3], i % 2 == 0, i) for i, (m, n, k) in enumerate(SHAPES)]
CASE_IDS = ["M{}N{}K{}T{}g{}".format(*c[:5]) + ("b" if c[5] else "") for c in CASES]
# small blocks: several row/column blocks and, for "shift", K chunks inside one group (block_k 4
# < group 5) and groups of 4 and 5 against 16-wide chunks for "dot"; defaults every other case
BLOCKS = {"shift": [{}, dict(block_n=8, block_k=4)],
          "dot": [dict(block_m=16, block_n=16, block_k=16)] * 2}


@pytest.mark.parametrize("variant", ["shift", "dot"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_fp32_matches_reference(variant, case):
    m, n, k, terms, group, bias, i = case
    activation = ACTIVATIONS[(i + 2 * (variant == "dot")) % len(ACTIVATIONS)]
    x, codes, scale, b = make_inputs((m,), n, k, terms, group, bias=bias, seed=100 * i + len(variant))
    y = run_poisoned(x, codes, scale, b, group, activation, variant=variant, **BLOCKS[variant][i % 2])
    torch.testing.assert_close(y, reference(x, codes, scale, b, group, activation), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["shift", "dot"])
@pytest.mark.parametrize("case", CASES[::2] + CASES[1::4], ids=CASE_IDS[::2] + CASE_IDS[1::4])
def test_kernel_bf16_matches_fp32_reference(variant, case):
    """bf16 x against the reference in fp32 on the same (rounded) operands. "dot" multiplies
    the reference's own bf16 weight (fp32 decode rounded to bf16), so that is the oracle's
    weight; "shift" multiplies by the exact weight. Tolerance 3 eps: the output's rounding
    (eps/2; the interpreter's cast truncates, eps), the interpreter's truncated weight tile in
    "dot" (errors up to eps per element, random signs) and the summation order; measured worst
    case 1.4 eps (times 1 + |y|) for "dot", 0.65 for "shift"."""
    m, n, k, terms, group, bias, i = case
    activation = ACTIVATIONS[(3 * i + 1) % len(ACTIVATIONS)]
    x, codes, scale, b = make_inputs((m,), n, k, terms, group, torch.bfloat16, bias, seed=100 * i + 7)
    y = run_poisoned(x, codes, scale, b, group, activation, variant=variant, **BLOCKS[variant][i % 2])
    assert y.dtype == torch.bfloat16
    w = decode_weight(codes, scale, group, k, torch.bfloat16 if variant == "dot" else torch.float32)
    pre = F.linear(x.float(), w.float(), None if b is None else b.float())
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(y.float(), TORCH_ACTIVATIONS[activation](pre), atol=3 * eps, rtol=3 * eps)


def test_kernel_cases_are_meaningful():
    """Activations see both signs, scales vary along K, and padding nibbles are not zero codes."""
    for m, n, k, terms, group, bias, i in CASES:
        x, codes, scale, b = make_inputs((m,), n, k, terms, group, bias=bias, seed=100 * i + 5)
        pre = reference(x, codes, scale, b, group)
        assert (pre < -0.1).any() and (pre > 0.1).any() if m * n > 8 else pre.abs().max() > 0.1
        assert group == 0 or len(set(scale[0].tolist())) > 1
        assert k % 2 == 0 or ((codes[..., -1] >> 4) != 7).any()


# (M, N, K, T, group): exact cases across the shapes, T and groups
EXACT_CASES = [(1, 24, 33, 3, 5), (5, 5, 7, 1, 0), (37, 24, 33, 2, 4), (5, 24, 7, 3, 0),
               (1, 5, 33, 2, 0)]


@pytest.mark.parametrize("variant", ["shift", "dot"])
@pytest.mark.parametrize("case", EXACT_CASES, ids=lambda c: "M{}N{}K{}T{}g{}".format(*c))
def test_kernel_bit_exact_on_dyadic_inputs(variant, case):
    """Where fp32 math is exact (checked: the fp32 reference equals the fp64 one), the kernel's
    result must equal it bit for bit: each x * 2^-e, each sum and each scaling is exact. For
    "shift" this pins the exponent arithmetic (signs, zero codes, every e) on every element."""
    m, n, k, terms, group = case
    x, codes, scale, b = make_dyadic((m,), n, k, terms, group, bias=m != 5, seed=sum(case))
    expected = F.relu(shift_linear_reference(x, codes, scale, b, group))
    exact = F.relu(shift_linear_reference(x.double(), codes, scale.double(),
                                          None if b is None else b.double(), group))
    assert torch.equal(expected.double(), exact), "not an exact case: pick smaller operands"
    assert (x < 0).any() and (x == 0).any() and (scale < 0).any()
    blocks = BLOCKS[variant][m % 2]
    assert torch.equal(run_poisoned(x, codes, scale, b, group, "relu", variant=variant, **blocks), expected)
    negated = run_poisoned(-x.abs(), codes, scale, b, group, variant=variant, **blocks)
    assert torch.equal(negated, shift_linear_reference(-x.abs(), codes, scale, b, group))


@pytest.mark.parametrize("variant", ["shift", "dot"])
def test_kernel_zero_inputs_give_the_bias(variant):
    x, codes, scale, b = make_inputs((5,), 24, 33, 3, 4, seed=11)
    zeros = torch.zeros_like(x)
    zeros[1::2] = -0.0
    assert torch.equal(run_poisoned(zeros, codes, scale, b, 4, variant=variant), b.expand(5, 24))
    assert torch.equal(run_poisoned(zeros, codes, scale, None, 4, variant=variant), torch.zeros(5, 24, device=DEVICE))


def tiny_floats(count, seed):
    """fp32 values near and below the smallest normal (exponent fields 0 to 12, random
    mantissas and signs), plus the edge cases: signed zeros, the smallest subnormals (ties at
    every shift), the largest subnormal, the smallest normals, infinities and nan."""
    g = torch.Generator().manual_seed(seed)
    bits = (torch.randint(0, 13, (count,), generator=g) << 23) | \
        torch.randint(0, 1 << 23, (count,), generator=g)
    special = torch.tensor([0, 1, 2, 3, 5, 6, 7, 11, 24, 40, 48, 96, 0x7FFFFF, 0x800000,
                            0x800001, 0x800040, 0xFFFFFF, 0x1000000, 0x7F800000, 0x7FC00000])
    bits = torch.cat([bits, special])
    signs = torch.randint(0, 2, bits.shape, generator=g)
    signed = (bits | (signs << 31)).to(torch.int64)
    signed = torch.where(signed >= 1 << 31, signed - (1 << 32), signed)  # two's complement
    return torch.cat([signed, special]).to(torch.int32).view(torch.float32)


def same_bits(a, b):
    """Bit-equal fp32 tensors, except that zeros match either sign and nans match any nan."""
    same = (a.view(torch.int32) == b.view(torch.int32)) | ((a == 0) & (b == 0)) | (a.isnan() & b.isnan())
    return bool(same.all())


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf under the interpreter
@pytest.mark.parametrize("terms", [1, 2])
def test_shift_products_match_ieee_multiply_near_subnormals(terms):
    """K = 1, scale 1: each output is sum_t x * q_t, formed from x's bits; it must equal torch's
    IEEE products (and their fp32 sum for T = 2) bit for bit, including results that underflow
    to subnormals (rounded to nearest even) or zero, and inf * 0 = nan."""
    x = tiny_floats(64, seed=terms)[:, None]
    g = torch.Generator().manual_seed(20 + terms)
    low = torch.arange(16, dtype=torch.uint8) if terms == 1 else \
        torch.randint(0, 16, (terms, 16), generator=g, dtype=torch.uint8)
    padding = torch.randint(0, 16, (terms, 16), generator=g, dtype=torch.uint8) << 4
    codes = (low.expand(terms, 16) | padding)[..., None]
    scale = torch.ones(16, 1)
    q = code_values(torch.float32, "cpu")[(codes[..., 0] & 15).long()]  # [T, 16]
    expected = x * q[0]
    for t in range(1, terms):
        expected = expected + x * q[t]
    assert (expected != 0).logical_and(expected.abs() < torch.finfo(torch.float32).tiny).sum() > 100
    y = shift_linear_triton(x.to(DEVICE), codes.to(DEVICE), scale.to(DEVICE), variant="shift")
    assert same_bits(y.cpu(), expected)
    if terms == 1:  # (for T = 2 the reference multiplies by q_1 + q_2: other roundings)
        assert same_bits(y.cpu(), OP(x, codes, scale))


@pytest.mark.parametrize("impl", ["op", "ref", "shift", "dot"])
def test_bad_arguments_raise_value_error(impl):
    call = {"op": OP, "ref": shift_linear_reference,
            "shift": lambda *a: shift_linear_triton(*a, variant="shift"),
            "dot": lambda *a: shift_linear_triton(*a, variant="dot")}[impl]
    x, codes, scale, b = make_inputs((3,), 5, 7, 2, 4)
    bad_calls = {
        "codes dtype": (x, codes.to(torch.int16), scale, b, 4),
        "codes float": (x, codes.float(), scale, b, 4),
        "codes 2-D": (x, codes[0], scale, b, 4),
        "codes bytes": (x, codes[..., :-1], scale, b, 4),
        "x's features": (x[:, :-2], codes, scale, b, 4),
        "scale groups": (x, codes, scale[:, :1], b, 4),
        "group vs scale": (x, codes, scale, b, 0),
        "scale rows": (x, codes, scale[:-1], b, 4),
        "bias": (x, codes, scale, b[:-1], 4),
    }
    for what, args in bad_calls.items():
        with pytest.raises(ValueError, match="shift op"):
            call(*args)
            pytest.fail(f"no error for a bad {what}")


def test_kernel_bad_options_raise_value_error():
    x, codes, scale, b = make_inputs((3,), 5, 7, 2, 0)
    with pytest.raises(ValueError, match=r"activation='tanh'"):
        shift_linear_triton(x, codes, scale, b, 0, "tanh")
    with pytest.raises(ValueError, match="variant"):
        shift_linear_triton(x, codes, scale, b, variant="mul")
    with pytest.raises(ValueError, match="out must be"):
        shift_linear_triton(x, codes, scale, b, out=torch.empty(3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="powers of two >= 16"):
        shift_linear_triton(x, codes, scale, b, variant="dot", block_k=8)
    with pytest.raises(ValueError, match="powers of two"):
        shift_linear_triton(x, codes, scale, b, variant="shift", block_n=6)
    with pytest.raises(ValueError, match="shift op"):
        shift_linear_triton(x.double(), codes, scale, b.double())
    with pytest.raises(ValueError, match="shift op"):
        shift_linear_triton(x, codes, scale, b.half())


def test_kernel_strided_operands_and_leading_dims():
    """Transposed x and codes, sliced scale and bias, a strided output, 3-D x: all strides are
    honoured."""
    for variant in ("shift", "dot"):
        x, codes, scale, b = make_inputs((2, 9), 20, 33, 2, 5, seed=12)
        xs = x.transpose(1, 2).contiguous().transpose(1, 2)
        cs = codes.permute(0, 2, 1).contiguous().permute(0, 2, 1)
        ss = scale.t().contiguous().t()
        bs = torch.stack([b, b], 1).reshape(-1)[::2]
        assert not any(t.is_contiguous() for t in (xs, cs, ss, bs))
        buffer = torch.full((2, 9, 40), float("nan"), device=DEVICE)
        y = shift_linear_triton(xs, cs, ss, bs, 5, "gelu", variant=variant, out=buffer[..., ::2])
        torch.testing.assert_close(y, reference(x, codes, scale, b, 5, "gelu"), atol=1e-5, rtol=1e-5)
        assert not y.isnan().any() and buffer[..., 1::2].isnan().all()


def test_kernel_empty_and_k0():
    x, codes, scale, b = make_inputs((0,), 5, 7, 2, 0)
    for variant in ("shift", "dot"):
        assert shift_linear_triton(x, codes, scale, b, variant=variant).shape == (0, 5)
        x0, codes0, scale0, b0 = make_inputs((3,), 5, 0, 2, 0)
        y = run_poisoned(x0, codes0, scale0, b0, 0, variant=variant)
        assert torch.equal(y, b0.expand(3, 5))


def test_op_cpu_is_the_reference():
    for bias in (True, False):
        x, codes, scale, b = make_inputs((2, 5), 6, 9, 2, 4, bias=bias, seed=13, device="cpu")
        assert torch.equal(OP(x, codes, scale, b, 4), shift_linear_reference(x, codes, scale, b, 4))


def test_op_on_cuda_picks_the_variant_by_rows(monkeypatch):
    """The op's non-CPU dispatch: shift up to SHIFT_MAX_ROWS rows, dot above, the reference
    off CUDA (devices stood in for)."""
    calls = []
    monkeypatch.setattr(shift, "shift_linear_triton",
                        lambda *args, variant: calls.append(variant))
    monkeypatch.setattr(shift, "shift_linear_reference", lambda *args: calls.append("reference"))

    class Stand:  # what the dispatch reads
        def __init__(self, device, *shape):
            self.device, self.shape = torch.device(device), shape

    for device, shape in [("cuda", (1, 8)), ("cuda", (2, 8, 8)), ("cuda", (17, 8)),
                          ("cuda", (3, 6, 8)), ("meta", (1, 8))]:
        shift._shift_linear_default(Stand(device, *shape), None, None)
    assert shift.SHIFT_MAX_ROWS == 16
    assert calls == ["shift", "shift", "dot", "dot", "reference"]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_under_torch_compile(backend):
    x, codes, scale, b = make_inputs((2, 5), 6, 9, 2, 4, seed=14, device="cpu")

    def fn(x, codes, scale, b):
        return torch.relu(OP(x, codes, scale, b, 4)) * 2 + 1

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    expected = torch.relu(shift_linear_reference(x, codes, scale, b, 4)) * 2 + 1
    torch.testing.assert_close(compiled(x, codes, scale, b), expected, atol=1e-6, rtol=1e-6)
    x2 = make_inputs((3,), 6, 9, 2, 4, seed=15, device="cpu")[0]  # another rank, no bias
    torch.testing.assert_close(compiled(x2, codes, scale, None),
                               torch.relu(shift_linear_reference(x2, codes, scale, None, 4)) * 2 + 1,
                               atol=1e-6, rtol=1e-6)


def test_op_fake_tensor_shapes_and_opcheck():
    with FakeTensorMode():
        y = OP(torch.empty(4, 7, 9, dtype=torch.bfloat16), torch.empty(2, 6, 5, dtype=torch.uint8),
               torch.empty(6, 3), None, 4)
        assert y.shape == (4, 7, 6) and y.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="shift op"):
            OP(torch.empty(4, 8), torch.empty(2, 6, 5, dtype=torch.uint8), torch.empty(6, 1))
    x, codes, scale, b = make_inputs((3,), 6, 9, 2, 4, seed=16, device="cpu")
    torch.library.opcheck(OP, (x, codes, scale, b, 4))
    torch.library.opcheck(OP, (x, codes, scale, None, 4))


# Run where Triton compiles for a GPU (no TRITON_INTERPRET), which needs no GPU to reach a cubin.
_CUDA_CHECK = textwrap.dedent("""
    import json, torch, triton
    from torch._library.triton import get_triton_kernels_for_op
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import effc.kernels.shift as shift

    kernels = {v: getattr(shift, f"_shift_linear_{v}_kernel") for v in ("shift", "dot")}
    result = {"found_by_triton_op": get_triton_kernels_for_op("effc::shift_linear")
              == [kernels["shift"], kernels["dot"]], "compiled": []}
    for variant, dtype, blocks in [("shift", "fp32", (1, 32, 64)), ("shift", "bf16", (16, 32, 8)),
                                   ("dot", "fp16", (64, 64, 64)), ("dot", "bf16", (16, 16, 16)),
                                   ("dot", "fp32", (64, 64, 32))]:
        kernel = kernels[variant]
        const = dict(HAS_BIAS=True, ACTIVATION=0, INPUT_PRECISION="ieee", UPCAST_DOT=False,
                     BLOCK_M=blocks[0], BLOCK_N=blocks[1], BLOCK_K=blocks[2])
        ptrs = {"codes_ptr": "*u8", "scale_ptr": "*fp32"}
        sig = {n: "constexpr" if n in const else ptrs.get(n, "*" + dtype) if n.endswith("_ptr")
               else "i32" for n in kernel.arg_names}
        done = triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 2})
        ttir = done.asm["ttir"]
        result["compiled"].append([variant, dtype, ttir.count("tt.dot"), ttir.count("arith.mulf"),
                                   len(done.asm["cubin"])])
    print(json.dumps(result))
""")


@pytest.mark.slow
def test_kernels_compile_for_cuda_and_triton_op_finds_them(tmp_path):
    """The interpreter accepts more than the compiler: both kernels must compile for sm_90, the
    shift kernel with one fp32 multiply only (the group scale; none for weight values) and no
    dot, the dot kernel with one tt.dot; triton_op's source scan must find both."""
    result = cuda_check(_CUDA_CHECK, tmp_path)
    assert result["found_by_triton_op"]
    assert [(v, d, dots) for v, d, dots, _, _ in result["compiled"]] == [
        ("shift", "fp32", 0), ("shift", "bf16", 0), ("dot", "fp16", 1), ("dot", "bf16", 1),
        ("dot", "fp32", 1)]
    assert [muls for v, _, _, muls, _ in result["compiled"] if v == "shift"] == [1, 1]
    assert all(size > 0 for *_, size in result["compiled"])
