"""kv_proj_weights: the bases folded into the projections (exactness in generation
is tested with the pass, tests/passes/test_kv_proj.py)."""

import operator

import torch

from effc.passes.kv_proj_weights import worth_it


def test_only_graphs_with_enough_tokens_are_worth_folding():
    """Folding costs about d r token-projections; it saves d - r per projected token."""
    assert worth_it(tokens=65, d=64, r=32) and not worth_it(tokens=64, d=64, r=32)
    assert not worth_it(tokens=1, d=128, r=16)  # a decode step


B, T, H, G, D, R = 2, 5, 4, 2, 8, 4  # batch, tokens, query heads, KV heads, head dim, rank


def _fused(x, w, b, p, mu):
    """GPT-2's attention inputs: one Conv1D (addmm, W [in, out]) for q, k and v, split; the
    cache stores (k - mu) P."""
    qkv = torch.addmm(b, x.view(-1, H * D), w).view(B, T, 3 * H * D)
    q, k, v = qkv.split(H * D, dim=2)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    return q, (k - mu) @ p, v


def _separate(x, wq, wk, bk, p, mu):
    """Llama's, without RoPE, grouped queries: the queries in their KV head's key basis, and
    the keys the cache stores."""
    q = torch.nn.functional.linear(x, wq).view(B, T, -1, D).transpose(1, 2)
    k = torch.nn.functional.linear(x, wk, bk).view(B, T, -1, D).transpose(1, 2)
    return q @ p.repeat_interleave(H // G, 0), (k - mu) @ p


def _folded(fn, inputs, roles):
    """`fn` traced, the parts named in `roles` folded (keys' store, queries' product)."""
    from effc.compiler.graph_facts import remove_dead_code
    from effc.passes.attention_sites import heads_part
    from effc.passes.kv_proj_weights import Fold, fold_in, store_of
    from tests.lowering_helpers import traced

    gm = traced(fn, *inputs)
    ph = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    store, heads, mean = store_of(gm.graph, ph["p"], ph["mu"])
    folds = []
    if "k" in roles:
        folds.append(Fold("k_proj", heads_part(heads), store, ph["p"], mean))
    if "q" in roles:
        product = next(n for n in gm.graph.nodes if n.target is operator.matmul and n is not store)
        folds.append(Fold("q_proj", heads_part(product.args[0]), product, ph["p"], None, H // G))
    fold_in(gm.graph, folds)
    remove_dead_code(gm.graph)
    gm.recompile()
    return gm


def _close(got, want):
    for a, b in zip(got, want):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_a_fused_projection_is_rebuilt_once_with_only_the_keys_columns_folded():
    """GPT-2's c_attn with the keys folded: one addmm, reading the queries' and values' columns
    of W as they are and the keys' as P^T (W_k, b_k - mu): the same q, stored keys and v."""
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(B, T, H * D, generator=g), torch.randn(H * D, 3 * H * D, generator=g),
              torch.randn(3 * H * D, generator=g), torch.linalg.qr(torch.randn(
                  H, D, R, generator=g))[0], torch.randn(H, 1, D, generator=g))
    gm = _folded(_fused, inputs, "k")
    _close(gm(*inputs), _fused(*inputs))
    addmms = [n for n in gm.graph.nodes if n.target is torch.addmm]
    assert len(addmms) == 1 and addmms[0].args[2].target is torch.cat  # not W itself


def test_separate_projections_fold_keys_and_grouped_queries():
    """k_proj (with bias and mean) and q_proj (each query head with its KV head's basis)."""
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(B, T, 32, generator=g), torch.randn(H * D, 32, generator=g),
              torch.randn(G * D, 32, generator=g), torch.randn(G * D, generator=g),
              torch.linalg.qr(torch.randn(G, D, R, generator=g))[0],
              torch.randn(G, 1, D, generator=g))
    gm = _folded(_separate, inputs, "qk")
    _close(gm(*inputs), _separate(*inputs))
    linears = [n for n in gm.graph.nodes if n.target in (torch._C._nn.linear,
                                                         torch.nn.functional.linear)]
    assert len(linears) == 2 and all(n.args[1].op != "placeholder" for n in linears)
    assert not any(n.target is operator.matmul for n in gm.graph.nodes)  # no product with P
