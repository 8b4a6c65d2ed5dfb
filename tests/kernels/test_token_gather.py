"""The token_skip pass's ops (effc::token_route, token_gather, token_scatter_add): routing
against torch.topk and a threshold mask, references against index_select / index_add, Triton
kernels against the references under the interpreter (tests/conftest.py) on ragged shapes with
NaN-poisoned outputs, fake implementations, and the ops inside a lowering="triton" graph."""

import math
import textwrap
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from lowering_helpers import DEVICE
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from helpers import cuda_check

import effc
import effc.kernels.token_gather_triton as triton_kernels
from effc.compiler.lowering.codegen import launch
from effc.kernels.token_gather import (route_count, token_gather, token_gather_reference,
                                       token_route, token_scatter_add,
                                       token_scatter_add_reference)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=_gen(seed)).to(dtype=dtype, device=DEVICE)


def _unique_index(n, m, seed):
    return torch.randperm(n, generator=_gen(seed))[:m].to(DEVICE)


# ---------------------------------------------------------------- token_route ----------------

@pytest.mark.parametrize("tokens", [1, 7, 8, 13, 25, 100])
@pytest.mark.parametrize("capacity", ["0", "1", "0.875", "0.5", "0.07", "0.28", "1.5", "-0.25"])
def test_top_k_keeps_ceil_capacity_times_tokens_per_row(capacity, tokens):
    """B * min(T, max(0, ceil(c T))) in exact arithmetic: 0.07 * 100 is 7.000000000000001 in
    floats (0.28 * 25 likewise), and still keeps 7."""
    k = min(tokens, max(0, math.ceil(Fraction(capacity) * tokens)))
    idx = token_route(_randn(3, tokens, seed=tokens), float(capacity))
    assert idx.dtype == torch.int64 and idx.shape == (3 * k,)
    assert route_count(tokens, float(capacity)) == k


@pytest.mark.parametrize("tokens,capacity", [(16, 0.25), (13, 0.5), (9, 0.875), (5, 1.0)])
def test_top_k_selects_each_rows_highest_scores_in_token_order(tokens, capacity):
    scores = _randn(4, tokens, seed=tokens)                     # distinct values: no ties
    idx = token_route(scores, capacity).cpu()
    k = route_count(tokens, capacity)
    assert torch.all(idx[1:] > idx[:-1]), "flat indices ascending"
    rows, cols = idx // tokens, idx % tokens
    assert rows.tolist() == [b for b in range(4) for _ in range(k)]
    top = torch.topk(scores.cpu(), k, dim=1).indices
    for b in range(4):
        assert set(cols[rows == b].tolist()) == set(top[b].tolist())


def test_top_k_ties_prefer_the_lower_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0, 3.0]], device=DEVICE)
    assert token_route(scores, 0.4).tolist() == [1, 2, 5, 6]
    assert token_route(scores, 0.6).tolist() == [1, 2, 3, 5, 6, 7]
    # long rows of three values, where an unstable sort picks other tied tokens
    levels = torch.randint(0, 3, (4, 3000), generator=_gen(0)).float()
    idx = token_route(levels.to(DEVICE), 0.5).cpu().view(4, -1) % 3000
    for row, got in zip(levels.tolist(), idx.tolist()):
        want = sorted(range(3000), key=lambda t: (-row[t], t))[:1500]
        assert got == sorted(want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [-0.5, 0.0, 0.3, 5.0])
def test_threshold_mode_is_nonzero_of_the_mask(threshold, dtype):
    scores = _randn(3, 11, seed=7, dtype=dtype)
    idx = token_route(scores, 0.5, threshold)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, torch.nonzero((scores.float() >= threshold).reshape(-1)).reshape(-1))


def test_threshold_mode_is_causal_and_top_k_is_not():
    """Appending tokens leaves every earlier token's decision unchanged (flat b * T + t mapped to
    b * T' + t); top-k mode can change them, so the comparison would notice."""
    short = _randn(3, 9, seed=11)
    long = torch.cat([short, _randn(3, 6, seed=12) + 2.0], dim=1)   # high later scores

    def decisions(scores, threshold):
        idx = token_route(scores, 0.5, threshold).cpu()
        t = scores.shape[1]
        return [(int(i) // t, int(i) % t) for i in idx if int(i) % t < short.shape[1]]

    assert decisions(short, 0.2) == decisions(long, 0.2)
    assert decisions(short, None) != decisions(long, None)


# ------------------------------------------------- gather / scatter_add references ---------

SHAPES = [(13, 37, 0), (13, 37, 13), (50, 5, 17), (9, 1, 4), (64, 96, 31)]   # (N, D, M)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,m", SHAPES)
def test_gather_is_index_select(n, d, m, dtype):
    x, idx = _randn(n, d, seed=n + d, dtype=dtype), _unique_index(n, m, seed=m)
    out = token_gather(x, idx)
    assert out.shape == (m, d) and out.dtype == dtype
    assert torch.equal(out, x.index_select(0, idx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n,d,m", SHAPES)
def test_scatter_add_is_index_add_rounded_once(n, d, m, weighted, dtype):
    """Exactly the fp32 x.index_add(update * weight) rounded once to x's dtype: for fp32 that
    is torch's index_add bit for bit; bf16 index_add (product rounded first) is within a bf16
    rounding of it. x is left as it was."""
    x, idx = _randn(n, d, seed=n, dtype=dtype), _unique_index(n, m, seed=d)
    upd = _randn(m, d, seed=m + 1, dtype=dtype)
    w = _randn(m, seed=m + 2, dtype=dtype) if weighted else None
    before = x.clone()
    out = token_scatter_add(x, idx, upd, w)
    src = upd.float() * w.float()[:, None] if weighted else upd.float()
    assert torch.equal(out, x.float().index_add(0, idx, src).to(dtype))
    torch_add = x.index_add(0, idx, upd * w[:, None] if weighted else upd)
    if dtype == torch.float32:
        assert torch.equal(out, torch_add)
    torch.testing.assert_close(out, torch_add, atol=2e-2, rtol=2e-2)
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()


def test_scatter_add_takes_strided_x_and_weights_of_another_dtype():
    x = _randn(24, 10, seed=1).t()                                     # [10, 24], not contiguous
    idx, upd = _unique_index(10, 4, seed=2), _randn(4, 24, seed=3)
    w = _randn(4, seed=4, dtype=torch.bfloat16)
    out = token_scatter_add(x, idx, upd, w)
    assert out.is_contiguous()
    assert torch.equal(out, x.index_add(0, idx, upd * w.float()[:, None]))


@pytest.mark.parametrize("call,match", [
    (lambda: token_route(torch.randn(2, 3, 4), 0.5), "token_route expects"),
    (lambda: token_route(torch.ones(2, 3, dtype=torch.int64), 0.5), "token_route expects"),
    (lambda: token_route(torch.randn(2, 3), float("nan")), "finite"),
    (lambda: token_gather(torch.randn(5, 3), torch.tensor([0, 1], dtype=torch.int32)), "int64"),
    (lambda: token_scatter_add(torch.randn(5, 3), torch.tensor([0, 1]), torch.randn(2, 4), None),
     "token_scatter_add expects"),
    (lambda: token_scatter_add(torch.randn(5, 3), torch.tensor([0, 1]), torch.randn(2, 3),
                               torch.randn(3)), "token_scatter_add expects")])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- Triton kernels -------------

needs_triton = pytest.mark.skipif(triton_kernels.triton is None, reason="needs triton")

KERNEL_SHAPES = [(13, 37, 5), (50, 5, 17), (9, 1, 9), (64, 96, 31), (40, 200, 40)]


def _poisoned(shape, dtype, transposed=False):
    full = torch.full(shape[::-1] if transposed else shape, float("nan"), dtype=dtype,
                      device=DEVICE)
    return full.t() if transposed else full


@needs_triton
@pytest.mark.parametrize("blocks", [{}, dict(block_m=4, block_d=16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,m", KERNEL_SHAPES)
def test_gather_kernel_copies_the_rows_exactly(n, d, m, dtype, blocks):
    x, idx = _randn(n, d, seed=3 * n + d, dtype=dtype), _unique_index(n, m, seed=n * m)
    out = _poisoned((m, d), dtype, transposed=bool(blocks))
    got = triton_kernels.token_gather_triton(x, idx, out=out, **blocks)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, token_gather_reference(x, idx))


@needs_triton
@pytest.mark.parametrize("blocks", [{}, dict(block_m=4, block_d=16)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n,d,m", KERNEL_SHAPES)
def test_scatter_kernel_fp32_is_bit_exact(n, d, m, weighted, blocks):
    x = _randn(n, d, seed=5 * n + d)
    if blocks:
        x = x.t().contiguous().t()                                      # column-major x
    idx, upd = _unique_index(n, m, seed=m + d), _randn(m, d, seed=7 * m)
    w = _randn(m, seed=m + 9) if weighted else None
    out = _poisoned((n, d), torch.float32, transposed=bool(blocks))
    triton_kernels.token_scatter_add_triton(x, idx, upd, w, out=out, **blocks)
    assert torch.equal(out, token_scatter_add_reference(x, idx, upd, w))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,m", KERNEL_SHAPES[:3])
def test_scatter_kernel_16_bit_matches_the_reference(n, d, m, dtype):
    """Exact on a GPU and for fp16; the interpreter truncates fp32 -> bf16 (no rounding to
    nearest), so there bf16 may sit one bf16 ulp nearer zero, never further."""
    x, idx = _randn(n, d, seed=n, dtype=dtype), _unique_index(n, m, seed=d)
    upd, w = _randn(m, d, seed=m, dtype=dtype), _randn(m, seed=m + 1)
    out = _poisoned((n, d), dtype)
    triton_kernels.token_scatter_add_triton(x, idx, upd, w, out=out, block_m=4, block_d=16)
    ref = token_scatter_add_reference(x, idx, upd, w)
    if DEVICE.type == "cuda" or dtype == torch.float16:
        assert torch.equal(out, ref)
        return
    exact = x.float().index_add(0, idx, upd.float() * w[:, None])
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert not out.isnan().any()
    assert torch.all((out.float() - ref.float()).abs() <= ulp)
    assert torch.all(out.float().abs() <= exact.abs())              # truncated, not rounded


@needs_triton
def test_no_selected_rows_launch_nothing_and_copy_x():
    x, idx = _randn(7, 5, seed=0), torch.empty(0, dtype=torch.int64, device=DEVICE)
    out = _poisoned((7, 5), torch.float32)
    triton_kernels.token_scatter_add_triton(x, idx, torch.empty(0, 5, device=DEVICE), None,
                                            out=out)
    assert torch.equal(out, x)
    assert triton_kernels.token_gather_triton(x, idx).shape == (0, 5)


def test_the_ops_have_cuda_kernels_and_the_cpu_reference():
    for name in ("token_gather", "token_scatter_add"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"effc::{name}", "CUDA")
    x, idx = torch.randn(6, 4), torch.tensor([1, 4])
    assert torch.equal(torch.ops.effc.token_gather(x, idx), token_gather_reference(x, idx))


# ------------------------------------------------------------- fake implementations ---------

def test_opcheck_every_op():
    """All of opcheck's default checks pass, the threshold mode's data-dependent size
    included (its fake size is unbacked: opcheck's fake-tensor checks give it a ShapeEnv)."""
    scores = torch.randn(3, 10)
    for args in [(scores, 0.5, None), (scores, 0.0, None), (scores, 1.0, None),
                 (scores, 0.5, 0.3), (scores.bfloat16(), 0.7, -0.1)]:
        torch.library.opcheck(torch.ops.effc.token_route.default, args)
    x, idx = torch.randn(30, 7), torch.tensor([2, 5, 11, 29])
    torch.library.opcheck(torch.ops.effc.token_gather.default, (x, idx))
    torch.library.opcheck(torch.ops.effc.token_gather.default, (x.bfloat16(), idx[:0]))
    upd, w = torch.randn(4, 7), torch.rand(4)
    for args in [(x, idx, upd, w), (x, idx, upd, None), (x, idx[:0], upd[:0], w[:0]),
                 (x.bfloat16(), idx, upd.bfloat16(), w)]:
        torch.library.opcheck(torch.ops.effc.token_scatter_add.default, args)


def test_fake_sizes():
    """Top-k: exactly B * k. Threshold: a fresh unbacked size (needs a ShapeEnv; plain
    FakeTensorMode reports a dynamic output shape). Gather/scatter: [M, D] and x's shape."""
    with FakeTensorMode():
        scores = torch.empty(3, 10)
        assert token_route(scores, 0.875).shape == (27,)
        assert token_route(scores, 0.0).shape == (0,)
        with pytest.raises(torch._subclasses.fake_tensor.DynamicOutputShapeException):
            token_route(scores, 0.5, 0.1)
        x, idx = torch.empty(30, 7, dtype=torch.bfloat16), torch.empty(27, dtype=torch.int64)
        assert token_gather(x, idx).shape == (27, 7)
        out = token_scatter_add(x, idx, torch.empty(27, 7), torch.empty(27))
        assert out.shape == (30, 7) and out.dtype == torch.bfloat16
    with FakeTensorMode(shape_env=ShapeEnv()):
        size = token_route(torch.empty(3, 10), 0.5, 0.1).shape[0]
        assert isinstance(size, torch.SymInt) and str(size).startswith("u")


# ------------------------------------------------------------ inside a lowered graph ---------

class _SkipBlock(torch.nn.Module):
    """A Mixture-of-Depths block: route, gather, an MLP on the gathered rows, scatter back."""

    def __init__(self, threshold=None):
        super().__init__()
        self.router, self.w1, self.w2 = (torch.nn.Parameter(_randn(*s, seed=i) / 4)
                                         for i, s in enumerate([(16,), (24, 16), (16, 24)]))
        self.threshold = threshold

    def forward(self, h):
        b, t, d = h.shape
        scores = h @ self.router
        idx = token_route(scores, 0.5, self.threshold)
        flat = h.reshape(b * t, d)
        sel = token_gather(flat, idx)
        upd = F.linear(F.gelu(F.linear(sel, self.w1)), self.w2)
        w = torch.sigmoid(scores).reshape(-1).index_select(0, idx)
        return token_scatter_add(flat, idx, upd, w).reshape(b, t, d)


@pytest.mark.parametrize("threshold", [None, 0.0])
def test_the_ops_stay_eager_library_calls_in_a_triton_lowered_graph(threshold, monkeypatch):
    """ops.classify leaves effc ops it does not know to eager: the graph lowers (strict, so a
    kernel failure raises) with kernels around the routing ops, which run as library calls.
    The threshold mode's data-dependent size needs Dynamo's capture_dynamic_output_shape_ops
    (otherwise Dynamo breaks the graph at token_route); a second input with another number
    of routed tokens reuses the graph."""
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    torch._dynamo.reset()
    effc.reset()
    model = _SkipBlock(threshold).eval().to(DEVICE)
    options = {"lowering": "triton", "strict": True}
    compiled = torch.compile(model, backend="effc", options=options)
    # config.patch, not monkeypatch: undoing a setattr on Dynamo's config module deletes the key
    with torch.no_grad(), torch._dynamo.config.patch(
            capture_dynamic_output_shape_ops=threshold is not None):
        for seed in (1, 2):
            h = _randn(2, 9, 16, seed=seed)
            torch.testing.assert_close(compiled(h), model(h), atol=1e-5, rtol=1e-5)
    graphs = effc.report().graphs
    assert len(graphs) == 1 and not graphs[0].fallbacks and graphs[0].kernels
    eager = {op for ops in graphs[0].eager_ops.values() for op in ops}
    assert {"token_route", "token_gather", "token_scatter_add"} <= eager


# ---------------------------------------------------------------- CUDA compile check ---------

# Run where Triton compiles for a GPU (no TRITON_INTERPRET), which needs no GPU to reach a cubin:
# the wrappers' launches are recorded on CPU tensors instead of run, then compiled for sm_90
# with their own launch options, and once more with FMA contraction allowed.
_CUDA_CHECK = textwrap.dedent("""
    import json, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    import effc.kernels.token_gather_triton as tg

    calls = []
    JITFunction.run = lambda self, *a, grid, warmup, **kw: calls.append((self, a, kw))
    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int64: "i64"}
    for dtype in (torch.float32, torch.bfloat16):
        x, idx = torch.randn(40, 200).to(dtype), torch.arange(0, 40, 3)
        tg.token_gather_triton(x, idx)
        tg.token_scatter_add_triton(x, idx, torch.randn(14, 200).to(dtype), torch.rand(14))
        tg.token_scatter_add_triton(x, idx, torch.randn(14, 200).to(dtype), None)
    rows = []
    for kernel, args, kw in calls:
        values = dict(zip(kernel.arg_names, args), **kw)
        const = {p.name: values[p.name] for p in kernel.params if p.is_constexpr}
        sig = {n: "constexpr" if n in const else "*" + types[values[n].dtype]
               if isinstance(values[n], torch.Tensor) else "i32" for n in kernel.arg_names}
        opts = {k: kw[k] for k in ("num_warps", "enable_fp_fusion") if k in kw}
        fused = [dict(opts, enable_fp_fusion=True)] if "enable_fp_fusion" in opts else []
        for opts in [opts] + fused:
            done = triton.compile(ASTSource(kernel, sig, const),
                                  target=GPUTarget("cuda", 90, 32), options=opts)
            rows.append([kernel.__name__, sig["x_ptr"], const.get("HAS_WEIGHT"), opts,
                         done.asm["ptx"].count("fma.rn.f32"), len(done.asm["cubin"])])
    print(json.dumps(rows))
""")


@pytest.mark.slow
def test_kernels_compile_for_cuda_without_fma_contraction(tmp_path):
    """Both kernels compile for sm_90 for fp32 and bf16; the scatter is launched with
    enable_fp_fusion=False and then has no fp32 FMA (which would skip the product's rounding
    and break fp32 bit-exactness), where the default build of the same kernel has some."""
    rows = cuda_check(_CUDA_CHECK, tmp_path)
    assert len(rows) == 2 * (1 + 2 + 2) and all(size > 0 for *_, size in rows)
    gathers = [r for r in rows if r[0] == "_token_gather_kernel"]
    assert sorted(r[1] for r in gathers) == ["*bf16", "*fp32"]
    launched = [r for r in rows if r[0] == "_token_scatter_add_kernel"
                and r[3].get("enable_fp_fusion") is False]
    assert len(launched) == 4 and all(fmas == 0 for *_, fmas, _ in launched)
    fused = [r for r in rows if r[3].get("enable_fp_fusion") is True]
    assert any(r[4] > 0 for r in fused if r[2])
