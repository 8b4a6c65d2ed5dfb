"""The lowering's graph rewrites: GEMMs on a flattened input (GPT-2's Conv1D) computed on the
input, so epilogues fuse; legacy empty cat operands (the KV cache's first step) dropped."""

import pytest
import torch
import torch.nn.functional as F
from lowering_helpers import DEVICE, LOW_RANK, as_tuple, lower, traced

from effc.compiler.lowering.graph_rewrites import drop_empty_cat_operands, unflatten_gemms


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DEVICE)


X, W, B, R = rand(3, 7, 45), rand(45, 29, seed=1) * 0.2, rand(29, seed=2), rand(3, 7, 29, seed=3)
V, U = rand(8, 45, seed=4) * 0.2, rand(29, 8, seed=5) * 0.3


def conv1d_gelu(x, w, b):  # transformers' Conv1D.forward, then the MLP's activation
    size_out = x.size()[:-1] + (w.size(-1),)
    y = torch.addmm(b, x.view(-1, x.size(-1)), w)
    return F.gelu(y.view(size_out))


def conv1d_residual(x, w, b, r):
    return r + torch.addmm(b, x.view(-1, 45), w).view(3, 7, 29) * 0.5


def conv1d_alone(x, w, b):  # GPT-2's c_attn: the view feeds a split, nothing to fuse
    return torch.addmm(b, x.view(-1, 45), w).view(3, 7, 29).split(10, dim=-1)


def low_rank_viewed(x, v, u, b):  # the low_rank pass's rewrite of a Conv1D site
    return torch.tanh(LOW_RANK(x.reshape(-1, 45), v, u, b).view(3, 7, 29))


def two_users(x, w, b):  # the flat result is read too: not rewritten
    y = torch.addmm(b, x.view(-1, 45), w)
    return torch.relu(y.view(3, 7, 29)), y * 2.0


CASES = {"conv1d_gelu": (conv1d_gelu, (X, W, B), 1), "conv1d_residual": (conv1d_residual, (X, W, B, R), 1),
         "conv1d_alone": (conv1d_alone, (X, W, B), 0),
         "low_rank_viewed": (low_rank_viewed, (X, V, U, B), 1), "two_users": (two_users, (X, W, B), 0)}


@pytest.mark.parametrize("name", list(CASES))
def test_views_around_a_gemm_are_dropped_only_where_an_epilogue_gains(name):
    fn, args, expected = CASES[name]
    gm = traced(fn, *args)
    done = unflatten_gemms(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert len(done) == expected
    gemms = [n for n in gm.graph.nodes if n.target in (torch.addmm, torch.matmul)
             or n.target is LOW_RANK]
    x_args = [n.args[1] if n.target is torch.addmm else n.args[0] for n in gemms]
    assert gemms and all(len(x.meta["tensor_meta"].shape) == (3 if done else 2) for x in x_args)
    for o, r in zip(as_tuple(gm(*args)), as_tuple(fn(*args)), strict=True):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["conv1d_gelu", "conv1d_residual", "low_rank_viewed"])
def test_the_lowering_fuses_the_epilogue_into_the_gemm(name):
    fn, args, _ = CASES[name]
    out, report, gm, _ = lower(fn, *args)
    (kernel,) = report.kernels
    assert kernel.kind == "gemm" and len(kernel.nodes) >= 2  # the GEMM and its epilogue
    assert any("flattened input" in note for note in report.notes)
    torch.testing.assert_close(out, fn(*args), rtol=1e-5, atol=1e-5)
    assert not any(n.target is torch.addmm for n in gm.graph.nodes)


def test_gpt2_mlp_gemms_fuse_their_gelu_and_match_eager():
    """In the whole model: each c_fc GEMM computes gelu_new in its epilogue; the bare c_attn
    GEMMs stay the library's addmm."""
    import effc
    from helpers import first_tensor, hf_model

    model, inputs = hf_model("gpt2")
    model.eval().to(DEVICE)  # on CUDA the kernels compile; on the CPU the interpreter runs them
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    outs = []
    for lowering in ("eager", "triton"):
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(model, backend="effc", options={"lowering": lowering})
            outs.append(first_tensor(compiled(**inputs)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    graph = effc.report().graphs[-1]
    gemms = [k for k in graph.kernels if k.kind == "gemm"]
    assert len(gemms) == 2 and all(any(n.startswith("tanh") for n in k.nodes) for k in gemms)
    assert any("6 GEMMs on a flattened input" in note for note in graph.notes)


EMPTY = torch.tensor([], device=DEVICE)
CATS = {  # fn, inputs, cats rewritten
    "cache_first_step": (lambda c, k: torch.cat([c, k], dim=-2), (EMPTY, X), 1),
    "keyword_and_two_empties": (lambda c, k: torch.cat(tensors=[c, k, c], dim=1), (EMPTY, X), 1),
    "all_empty": (lambda c, k: torch.cat([c, c]) + k.sum(), (EMPTY, X), 0),
    "one_dim_result": (lambda c, k: torch.cat([c, k.flatten()]), (EMPTY, X), 0),
    "empty_sets_dtype": (lambda c, k: torch.cat([c.double(), k.half()], dim=0), (EMPTY, X), 0),
}


@pytest.mark.parametrize("name", list(CATS))
def test_legacy_empty_cat_operands_are_dropped_where_nothing_else_changes(name):
    fn, args, expected = CATS[name]
    gm = traced(fn, *args)
    assert len(drop_empty_cat_operands(gm.graph)) == expected
    gm.recompile()
    out, ref = gm(*args), fn(*args)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
