"""TokenSelect's ops (effc::select_tokens, gather_attention, select_attention): the selection
against a soft vote computed here head by head, the attention against SDPA (grouped-query,
full and on gathered or masked tokens), the Triton kernels against the references under the
interpreter (tests/conftest.py) on ragged shapes with NaN-poisoned outputs, the fake
implementations (opcheck; one Dynamo frame for a growing cache), and an sm_90 compile.

Tolerances. Attention outputs are convex combinations of value rows, so their rounding error
scales with max|v|, not with the (possibly cancelling, near-zero) output element: fp32 bounds
are |got - want| <= tol * max|v| + tol * |want|. 1e-6 against SDPA (another summation order;
seen up to 3e-7 on 20 seeds, T up to 1000), 1e-5 for the kernels (the online softmax rescales
block by block and the dot products sum in another order: not bit-exact)."""

import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import cuda_check
from lowering_helpers import DEVICE
from torch._dynamo.testing import CompileCounter
from torch._subclasses.fake_tensor import FakeTensorMode

import effc.kernels.select_attention_triton as sat
from effc.kernels.select_attention import (gather_attention, gather_attention_reference,
                                           score_logits_reference, select_attention,
                                           select_attention_reference, select_from_votes,
                                           select_tokens, select_tokens_reference, soft_votes)


def _inputs(bsz, heads, groups, tokens, dim, dv, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, heads, 1, dim, generator=g) * 2   # peaked softmaxes: clear top tokens
    k = torch.randn(bsz, groups, tokens, dim, generator=g)
    v = torch.randn(bsz, groups, tokens, dv, generator=g)
    return [t.to(dtype=dtype, device=DEVICE) for t in (q, k, v)]


def _close(got, want, v, tol):
    """|got - want| <= tol * max|v| + tol * |want| elementwise (see the module docstring)."""
    assert got.shape == want.shape and not got.isnan().any()
    err = (got.float() - want.float()).abs()
    assert torch.all(err <= tol * v.float().abs().max() + tol * want.float().abs()), \
        f"max error {err.max().item():.3g}, max|v| {v.float().abs().max().item():.3g}"


def _votes_by_hand(q, k, scale):
    """Soft votes [B, T] in fp64, one query head at a time: softmax over T, summed over heads."""
    bsz, heads, groups = q.shape[0], q.shape[1], k.shape[1]
    votes = torch.zeros(bsz, k.shape[2], dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            kv = k[b, h // (heads // groups)].double().cpu()
            votes[b] += torch.softmax(scale * (kv @ q[b, h, 0].double().cpu()), dim=0)
    return votes


SHAPES = [(2, 6, 2, 37, 24, 20), (2, 6, 3, 37, 24, 20), (1, 4, 4, 50, 16, 16),
          (3, 8, 1, 29, 10, 7)]                                    # (B, H, G, T, D, Dv)
BUDGETS = [(5, 2, 3), (9, 0, 0), (1, 4, 0), (0, 1, 6), (12, 1, 1)]  # (top_k, initial, recent)


# ------------------------------------------------------------------ select_tokens ----------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k,initial,recent", BUDGETS)
@pytest.mark.parametrize("shape", SHAPES)
def test_select_tokens_keeps_the_ends_and_the_top_soft_votes(shape, top_k, initial, recent,
                                                             dtype):
    bsz, heads, groups, tokens, dim, _ = shape
    q, k, _ = _inputs(*shape, seed=sum(shape) + top_k, dtype=dtype)
    scale = dim ** -0.5
    idx = select_tokens(q, k, scale, top_k, initial, recent)
    assert idx.dtype == torch.int64 and idx.shape == (bsz, initial + recent + top_k)
    votes = _votes_by_hand(q, k, scale)
    for b, row in enumerate(idx.cpu().tolist()):
        assert row == sorted(set(row)), "ascending, no repeats"
        assert row[:initial] == list(range(initial))
        assert row[len(row) - recent:] == list(range(tokens - recent, tokens))
        middle = sorted(range(initial, tokens - recent), key=lambda t: (-votes[b, t], t))
        assert row[initial:len(row) - recent] == sorted(middle[:top_k])
        if top_k:  # the data is no near-tie, where fp32 and fp64 votes could disagree
            assert votes[b, middle[top_k - 1]] - votes[b, middle[top_k]] > 1e-5


@pytest.mark.parametrize("top_k,initial,recent", [(30, 4, 3), (37, 0, 0), (0, 37, 0),
                                                  (0, 0, 40), (100, 100, 100)])
def test_select_tokens_keeps_every_token_when_the_budget_covers_them(top_k, initial, recent):
    q, k, _ = _inputs(2, 6, 3, 37, 24, 20, seed=1)
    idx = select_tokens(q, k, 0.2, top_k, initial, recent)
    assert torch.equal(idx.cpu(), torch.arange(37).expand(2, 37))


def test_ties_prefer_the_lower_index():
    """Zero keys give every token the same vote (exactly 1/T per head): the lowest middle
    indices win. Three vote levels over 3000 tokens, where an unstable sort picks others."""
    q, _, _ = _inputs(2, 4, 2, 20, 8, 8, seed=2)
    k = torch.zeros(2, 2, 20, 8, device=DEVICE)
    want = [0, 1] + list(range(2, 7)) + [17, 18, 19]
    assert select_tokens(q, k, 1.0, 5, 2, 3).tolist() == [want, want]
    levels = torch.randint(0, 3, (3, 3000), generator=torch.Generator().manual_seed(0)).float()
    got = select_from_votes(levels.to(DEVICE), 1500, 10, 20).cpu()
    for row, sel in zip(levels.tolist(), got.tolist()):
        top = sorted(range(10, 2980), key=lambda t: (-row[t], t))[:1500]
        assert sel == list(range(10)) + sorted(top) + list(range(2980, 3000))


# ------------------------------------------------------------ gather / select attention -----

def _sdpa(q, k, v, scale, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("shape", SHAPES + [(1, 2, 1, 1000, 64, 64)])
def test_gather_attention_over_every_token_is_sdpa(shape):
    q, k, v = _inputs(*shape, seed=sum(shape))
    bsz, tokens, scale = shape[0], shape[3], 0.3
    every = torch.arange(tokens, device=DEVICE).expand(bsz, tokens).contiguous()
    out = gather_attention(q, k, v, every, scale)
    assert out.shape == (bsz, shape[1], 1, shape[5]) and out.dtype == v.dtype
    _close(out, _sdpa(q, k, v, scale), v, 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_gather_attention_on_a_subset_is_sdpa_on_the_gathered_tokens(shape):
    """Any order and repeats: attention over a multiset of tokens."""
    q, k, v = _inputs(*shape, seed=3 * sum(shape))
    g = torch.Generator().manual_seed(sum(shape))
    index = torch.randint(0, shape[3], (shape[0], 11), generator=g).to(DEVICE)
    out = gather_attention(q, k, v, index, 0.25)
    for b in range(shape[0]):
        kb, vb = k[b:b + 1, :, index[b]], v[b:b + 1, :, index[b]]
        _close(out[b:b + 1], _sdpa(q[b:b + 1], kb, vb, 0.25), v, 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_select_attention_is_sdpa_over_the_selected_tokens(shape):
    """With a budget covering T: full SDPA. Below it: SDPA with a mask of select_tokens' picks."""
    q, k, v = _inputs(*shape, seed=5 * sum(shape))
    tokens, scale = shape[3], shape[4] ** -0.5
    _close(select_attention(q, k, v, scale, tokens - 3, 2, 1), _sdpa(q, k, v, scale), v, 1e-6)
    _close(select_attention(q, k, v, scale, tokens, 0, 0), _sdpa(q, k, v, scale), v, 1e-6)
    idx = select_tokens(q, k, scale, 6, 1, 2)
    mask = torch.zeros(shape[0], 1, 1, tokens, dtype=torch.bool, device=DEVICE)
    mask.scatter_(-1, idx[:, None, None, :], True)
    _close(select_attention(q, k, v, scale, 6, 1, 2), _sdpa(q, k, v, scale, mask), v, 1e-6)


def test_bf16_is_computed_in_fp32_and_rounded_once():
    q, k, v = _inputs(2, 6, 3, 37, 24, 20, seed=4, dtype=torch.bfloat16)
    idx = select_tokens(q, k, 0.2, 7, 1, 1)
    out = gather_attention(q, k, v, idx, 0.2)
    want = gather_attention(q.float(), k.float(), v.float(), idx, 0.2).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


@pytest.mark.parametrize("call,match", [
    (lambda: select_tokens(torch.randn(2, 4, 2, 8), torch.randn(2, 2, 9, 8), 1.0, 2),
     "select_tokens expects"),
    (lambda: select_tokens(torch.randn(2, 4, 1, 8), torch.randn(2, 3, 9, 8), 1.0, 2),
     "G dividing H"),
    (lambda: select_tokens(torch.randn(2, 4, 1, 8), torch.randn(2, 2, 9, 8), 1.0, -1),
     ">= 0"),
    (lambda: gather_attention(torch.randn(2, 4, 1, 8), torch.randn(2, 2, 9, 8),
                              torch.randn(2, 2, 9, 5), torch.zeros(2, 3, dtype=torch.int32),
                              1.0), "int64 index"),
    (lambda: gather_attention(torch.randn(2, 4, 1, 8), torch.randn(2, 2, 9, 8),
                              torch.randn(2, 2, 8, 5), torch.zeros(2, 3, dtype=torch.int64),
                              1.0), "v \\[B, G, T, Dv\\]")])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------- Triton kernels ----------

needs_triton = pytest.mark.skipif(sat.triton is None, reason="needs triton")
KERNEL_TOL = {torch.float32: 1e-5}
KERNEL_SHAPES = [(2, 6, 2, 37, 24, 20), (2, 6, 3, 37, 24, 20), (1, 3, 1, 70, 130, 9)]


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _kernel_close(got, want, v):
    """fp32: _close at 1e-5. bf16: both sides round the same fp32 value (to 1e-5) once, so they
    differ by at most one bf16 ulp (<= eps * |want|); the interpreter truncates instead of
    rounding to nearest, which stays within that ulp."""
    if got.dtype == torch.float32:
        return _close(got, want, v, 1e-5)
    eps = torch.finfo(got.dtype).eps
    err = (got.float() - want.float()).abs()
    assert not got.isnan().any()
    assert torch.all(err <= eps * want.float().abs() + 1e-5 * v.float().abs().max())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_score_kernel_matches_the_reference(shape, dtype):
    """Logits to 1e-5 of sum_d |q_d k_d| (a dot product's rounding bound), fp32 out; with
    16-token blocks of T and D: several of each, ragged tails."""
    q, k, _ = _inputs(*shape, seed=7 * sum(shape), dtype=dtype)
    want = score_logits_reference(q, k, 0.3)
    bound = 1e-5 * 0.3 * (q.float().abs().reshape(shape[0], shape[2], -1, shape[4])
                          @ k.float().abs().transpose(-1, -2)).reshape(want.shape)
    for blocks in ({}, dict(block_t=16, block_d=16)):
        out = _poisoned(want.shape, torch.float32)
        assert sat.score_logits_triton(q, k, 0.3, out=out, **blocks).data_ptr() == out.data_ptr()
        assert not out.isnan().any() and torch.all((out - want).abs() <= bound)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_gather_kernel_matches_the_reference(shape, dtype):
    """Selected, every and random (repeating, unsorted) indices; 16-row blocks of S and D."""
    q, k, v = _inputs(*shape, seed=11 * sum(shape), dtype=dtype)
    bsz, heads, _, tokens, _, dv = shape
    g = torch.Generator().manual_seed(sum(shape))
    indices = [select_tokens(q, k, 0.3, 9, 2, 3),
               torch.arange(tokens, device=DEVICE).expand(bsz, tokens),     # stride 0 rows
               torch.randint(0, tokens, (bsz, 21), generator=g).to(DEVICE)]
    for index in indices:
        want = gather_attention_reference(q, k, v, index, 0.3)
        for blocks in ({}, dict(block_s=16, block_d=16)):
            out = _poisoned((bsz, heads, 1, dv), dtype)
            sat.gather_attention_triton(q, k, v, index, 0.3, out=out, **blocks)
            _kernel_close(out, want, v)


@needs_triton
def test_kernels_read_strided_inputs_and_write_strided_outputs():
    q, k, v = _inputs(2, 6, 3, 37, 24, 20, seed=13)
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)                # D outer
    vt = v.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)        # T outer
    index = select_tokens(q, k, 0.3, 9, 2, 3)
    want = gather_attention_reference(q, k, v, index, 0.3)
    out = _poisoned((20, 1, 6, 2), torch.float32).permute(3, 2, 1, 0)
    sat.gather_attention_triton(q, kt, vt, index, 0.3, out=out)
    _kernel_close(out, want, v)
    logits = _poisoned((37, 6, 2), torch.float32).permute(2, 1, 0)
    sat.score_logits_triton(q, kt, 0.3, out=logits)
    assert torch.allclose(logits, score_logits_reference(q, k, 0.3), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_triton_selection_and_attention_match_the_references(shape):
    """Same picks as the reference, except where two votes tie to within the fp32 rounding
    of the logits (then the kernel's pick has the reference's boundary vote, to 1e-6)."""
    q, k, v = _inputs(*shape, seed=17 * sum(shape))
    got, want = (f(q, k, 0.3, 8, 2, 3) for f in (sat.select_tokens_triton,
                                                  select_tokens_reference))
    votes = soft_votes(score_logits_reference(q, k, 0.3))
    for b in range(shape[0]):
        extra = set(got[b].tolist()) - set(want[b].tolist())
        floor = votes[b, want[b]].min()
        assert all(votes[b, t] >= floor - 1e-6 for t in extra)
    assert torch.equal(got, want)                               # these seeds hold no near-tie
    out = sat.select_attention_triton(q, k, v, 0.3, 8, 2, 3)
    _kernel_close(out, select_attention_reference(q, k, v, 0.3, 8, 2, 3), v)


@needs_triton
def test_no_selected_tokens_give_zeros_as_the_reference():
    q, k, v = _inputs(2, 4, 2, 9, 8, 5, seed=19)
    empty = torch.empty(2, 0, dtype=torch.int64, device=DEVICE)
    out = sat.gather_attention_triton(q, k, v, empty, 0.5, out=_poisoned((2, 4, 1, 5),
                                                                          torch.float32))
    assert torch.equal(out, gather_attention_reference(q, k, v, empty, 0.5))
    assert not out.any()


def test_the_ops_have_cuda_kernels():
    for name in ("select_tokens", "gather_attention", "select_attention"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"effc::{name}", "CUDA")


# ------------------------------------------------------------ fake implementations ----------

def test_opcheck_every_op():
    q, k, v = _inputs(2, 6, 3, 37, 24, 20, seed=23)
    for args in [(q, k, 0.2, 5, 2, 3), (q, k, 0.2, 40, 0, 0),
                 (q.bfloat16(), k.bfloat16(), 0.2, 3, 0, 1)]:
        torch.library.opcheck(torch.ops.effc.select_tokens.default, args)
    index = select_tokens(q, k, 0.2, 5, 2, 3)
    for args in [(q, k, v, index, 0.2), (q, k, v, index[:, :0], 0.2),
                 (q.bfloat16(), k.bfloat16(), v.bfloat16(), index, 0.2)]:
        torch.library.opcheck(torch.ops.effc.gather_attention.default, args)
    for args in [(q, k, v, 0.2, 5, 2, 3), (q, k, v, 0.2, 37, 0, 0)]:
        torch.library.opcheck(torch.ops.effc.select_attention.default, args)


def test_fake_sizes_are_exact_for_a_concrete_cache_length():
    with FakeTensorMode():
        q, k, v = torch.empty(3, 8, 1, 16), torch.empty(3, 2, 100, 16), torch.empty(3, 2, 100, 12)
        assert select_tokens(q, k, 0.1, 10, 4, 8).shape == (3, 22)
        assert select_tokens(q, k, 0.1, 90, 4, 8).shape == (3, 100)
        out = select_attention(q, k, v.bfloat16(), 0.1, 10, 4, 8)
        assert out.shape == (3, 8, 1, 12) and out.dtype == torch.bfloat16


def test_a_growing_cache_compiles_once_without_a_graph_break():
    """Under dynamic shapes S is Min(T, budget), not a data-dependent size: a decode loop over
    cache lengths on both sides of the budget (7) runs one Dynamo frame, no graph break."""
    def step(q, k, v):
        index = select_tokens(q, k, 0.3, 4, 1, 2)
        return gather_attention(q, k, v, index, 0.3), index.shape[1]

    torch._dynamo.utils.counters.clear()  # the counters are global: other tests break graphs
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, dynamic=True)
    for tokens in (20, 33, 7, 5):
        q, k, v = _inputs(2, 4, 2, tokens, 8, 6, seed=tokens)
        (out, size), (want, want_size) = compiled(q, k, v), step(q, k, v)
        assert size == want_size == min(tokens, 7) and torch.equal(out, want)
    assert counter.frame_count == 1 and not torch._dynamo.utils.counters["graph_break"]


# -------------------------------------------------------------- CUDA compile check ----------

_CUDA_CHECK = textwrap.dedent("""
    import json, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    import effc.kernels.select_attention_triton as sat

    calls = []
    JITFunction.run = lambda self, *a, grid, warmup, **kw: calls.append((self, a, kw))
    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int64: "i64"}
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = torch.randn(2, 8, 1, 128), torch.randn(2, 2, 300, 128), torch.randn(2, 2, 300, 96)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        sat.score_logits_triton(q, k, 0.1)
        sat.gather_attention_triton(q, k, v, torch.arange(0, 300, 7).expand(2, -1), 0.1)
    rows = []
    for kernel, args, kw in calls:
        values = dict(zip(kernel.arg_names, args), **kw)
        const = {p.name: values[p.name] for p in kernel.params if p.is_constexpr}
        sig = {n: "constexpr" if n in const else "*" + types[values[n].dtype]
               if isinstance(values[n], torch.Tensor) else
               "fp32" if isinstance(values[n], float) else "i32" for n in kernel.arg_names}
        done = triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32))
        rows.append([kernel.__name__, sig["k_ptr"], len(done.asm["cubin"]),
                     done.asm["ptx"].count("ex2.approx")])
    print(json.dumps(rows))
""")


@pytest.mark.slow
def test_kernels_compile_for_cuda(tmp_path):
    """Both kernels compile to sm_90 cubins for fp32 and bf16 caches; the gather kernel's
    online softmax lowers its exps to ex2, the score kernel has none."""
    rows = cuda_check(_CUDA_CHECK, tmp_path)
    assert sorted((r[0], r[1]) for r in rows) == [
        ("_gather_attention_kernel", "*bf16"), ("_gather_attention_kernel", "*fp32"),
        ("_score_kernel", "*bf16"), ("_score_kernel", "*fp32")]
    assert all(size > 0 for _, _, size, _ in rows)
    assert all((exps > 0) == (name == "_gather_attention_kernel") for name, _, _, exps in rows)
