"""token_skip_attention: which attention blocks can route their queries, and the rewrite, on
small blocks (encoder with a padding mask, decoder with is_causal or a mask) and on Hugging
Face configs.

Tolerances: routed rows are compared with the unrouted block's rows to rtol 1e-5 / atol 1e-6
(the attention runs over fewer query rows, which changes no sum; measured equal to ~1e-7).
"""

import math

import pytest
import torch
from helpers import AttentionBlock, first_tensor, hf_model

from effc.compiler.graph_facts import GraphFacts, copy_graph_module
from effc.passes.token_skip import _Plan, find_sites, route_site
from effc.passes.token_skip_attention import is_causal, masked, queries_problem
from effc.passes.token_skip_math import Router


def _route(block, inputs, plan, kind="attention"):
    """(the `kind` site of `block`'s graph, the graph's outputs with it routed by `plan`), the
    site checked before it is rewritten."""
    out = {}

    def backend(gm, example):
        g = copy_graph_module(gm)
        (site,) = [s for s in find_sites(g, GraphFacts(g, example), (kind,)) if s.kind == kind]
        out["site"] = (site.kind, masked(site), queries_problem(site, "all"),
                       queries_problem(site, "selected"))
        route_site(g, site, plan)
        g.graph.eliminate_dead_code()
        g.recompile()
        rows = _LinearRows(g)
        out["routed"] = rows.run(*example)
        out["rows"] = rows.rows
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(block, backend=backend)(*inputs)
    _route.rows = out["rows"]
    return out["site"], out["routed"]


class _LinearRows(torch.fx.Interpreter):
    """Runs a graph and records, per linear weight (by its data pointer), the number of rows
    each of its linears saw."""

    def __init__(self, gm):
        super().__init__(gm)
        self.rows = {}

    def call_function(self, target, args, kwargs):
        if target is torch.nn.functional.linear:
            self.rows.setdefault(args[1].data_ptr(), []).append(args[0].shape[:-1].numel())
        return super().call_function(target, args, kwargs)


class _CausalBlock(AttentionBlock):
    """A decoder's attention block: causal (is_causal, or an explicit mask), returning the
    keys and values a cache would keep."""

    def __init__(self, mask: bool):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.project(x)
        if self.mask:
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        else:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(a.transpose(1, 2).reshape(b, t, d)), k, v


class _PaddedBlock(AttentionBlock):
    """An encoder's attention block with a padding mask: [B, 1, 1, T], or one row per query
    [B, 1, T, T]."""

    def __init__(self, rows: bool):
        super().__init__()
        self.rows = rows

    def forward(self, x, keep):
        b, t, d = x.shape
        q, k, v = self.project(x)
        mask = keep[:, None, None, :]
        if self.rows:
            mask = mask.expand(b, 1, t, t)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.o(a.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("rows", [False, True], ids=["broadcast_mask", "mask_rows"])
def test_a_padded_encoders_routed_queries_see_the_unpadded_keys(rows):
    torch.manual_seed(0)
    block, x = _PaddedBlock(rows).eval(), torch.randn(3, 11, 16)
    keep = torch.ones(3, 11, dtype=torch.bool)
    keep[1, 8:] = keep[2, 5:] = False  # padding at the end of two sequences
    router = Router(torch.randn(16), 0.1, 1.0, 1)
    chosen = (x @ router.weight + router.bias).topk(math.ceil(0.5 * 11)).indices
    (_, is_masked, problem, _), routed = _route(block, (x, keep), _Plan(router, 0.5, None, "all"))
    assert is_masked and problem == ""
    with torch.no_grad():
        full = block(x, keep)
    routed = first_tensor(routed)
    for b in range(3):
        rest = [t for t in range(11) if t not in chosen[b]]
        assert torch.equal(routed[b, rest], x[b, rest])
        torch.testing.assert_close(routed[b, chosen[b]], full[b, chosen[b]], rtol=1e-5,
                                   atol=1e-6)


class _PaddedLayer(_PaddedBlock):
    """A pre-norm encoder layer with a padding mask: the attention block, then an MLP block."""

    def __init__(self):
        super().__init__(rows=False)
        self.ln2 = torch.nn.LayerNorm(16)
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x, keep):
        h = super().forward(x, keep)
        return h + self.down(torch.relu(self.up(self.ln2(h))))


@pytest.mark.parametrize("kind, rows", [("attention", False), ("attention", True),
                                        ("layer", False)],
                         ids=["broadcast_mask", "mask_rows", "layer"])
def test_a_padded_encoders_routed_tokens_attend_among_themselves(kind, rows):
    """keys="selected" (and whole layers) with a padding mask: each sequence's routed tokens
    run the block alone, with their columns (and rows) of the mask: the block applied to the
    routed tokens and their part of the mask."""
    torch.manual_seed(0)
    block = (_PaddedLayer() if kind == "layer" else _PaddedBlock(rows)).eval()
    x, keep = torch.randn(3, 11, 16), torch.ones(3, 11, dtype=torch.bool)
    keep[1, 8:] = keep[2, 5:] = False
    router = Router(torch.randn(16), 0.1, 1.0, 1)
    chosen = (x @ router.weight + router.bias).topk(math.ceil(0.5 * 11)).indices.sort().values
    assert not keep.gather(1, chosen).all()  # padding among the routed tokens: it is masked
    _, routed = _route(block, (x, keep), _Plan(router, 0.5, None, "selected"), kind)
    routed = first_tensor(routed)
    for b in range(3):
        at = chosen[b]
        with torch.no_grad():
            alone = block(x[b:b + 1, at], keep[b:b + 1, at])[0]
        rest = [t for t in range(11) if t not in at]
        assert torch.equal(routed[b, rest], x[b, rest])
        torch.testing.assert_close(routed[b, at], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", [False, True], ids=["is_causal", "mask"])
def test_a_decoders_routed_queries_attend_causally_and_every_token_keeps_its_keys(mask):
    """Decoder attention (keys="all", per-token threshold): a routed token's output is the
    unrouted block's, a skipped token keeps its input, and every token's keys and values
    (what the cache keeps) are the unrouted block's; three sequences routing different
    numbers of tokens."""
    torch.manual_seed(0)
    block, x = _CausalBlock(mask).eval(), torch.randn(3, 11, 16)
    router = Router(torch.randn(16), 0.1, 1.0, 1)
    scores = x @ router.weight + router.bias
    cut = float(scores.median())
    (_, _, problem, selected), (routed, rk, rv) = _route(block, (x,), _Plan(router, 0.5, cut))
    assert problem == selected == ""
    with torch.no_grad():
        full, k, v = block(x)
    kept = scores >= cut
    assert len(set(kept.sum(1).tolist())) > 1  # the sequences route different numbers
    assert torch.equal(routed[~kept], x[~kept])
    torch.testing.assert_close(routed[kept], full[kept], rtol=1e-5, atol=1e-6)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    # the query projection runs on the routed rows alone (padded to the most any sequence
    # routes), the key and value projections on every token
    padded = 3 * int(kept.sum(1).max())
    rows = {name: _route.rows[lin.weight.data_ptr()] for name, lin in
            (("q", block.q), ("k", block.k), ("v", block.v), ("o", block.o))}
    assert rows == {"q": [padded], "k": [33], "v": [33], "o": [padded]}


def test_is_causal_tells_decoders_from_encoders():
    found = {}
    for kind in ("llama", "bert"):
        model, inputs = hf_model(kind)

        def backend(gm, example, kind=kind):
            found[kind] = is_causal(gm)
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model.eval(), backend=backend)(**inputs)
    assert found == {"llama": True, "bert": False}


@pytest.mark.parametrize("mask", [False, True], ids=["is_causal", "mask"])
def test_keys_selected_in_a_decoder_runs_the_block_on_the_routed_tokens_alone(mask):
    """Mixture-of-Depths proper (batch 1): the routed tokens attend among themselves, in
    order, and only their keys and values leave the block for the cache."""
    torch.manual_seed(0)
    block, x = _CausalBlock(mask).eval(), torch.randn(1, 11, 16)
    router = Router(torch.randn(16), 0.1, 1.0, 1)
    scores = x[0] @ router.weight + router.bias
    cut = float(scores.median())
    (_, _, _, problem), (routed, rk, rv) = _route(block, (x,), _Plan(router, 0.5, cut,
                                                                     "selected"))
    assert problem == ""
    kept = scores >= cut
    with torch.no_grad():
        alone, k, v = block(x[:, kept])
    assert torch.equal(routed[0, ~kept], x[0, ~kept])
    torch.testing.assert_close(routed[0, kept], alone[0], rtol=1e-5, atol=1e-6)
    assert rk.shape[-2] == int(kept.sum()) < 11
    torch.testing.assert_close(rk, k, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, v, rtol=1e-6, atol=1e-7)



class _CausalOutputOnly(_CausalBlock):
    """A decoder's attention block called without a cache: its keys and values stay in it."""

    def forward(self, x):
        return super().forward(x)[0]


@pytest.mark.parametrize("mask", [False, True], ids=["is_causal", "mask"])
def test_keys_selected_with_several_sequences_and_no_cache_attends_among_the_routed(mask):
    """Mixture-of-Depths proper at batch 3 without a cache: each sequence's routed tokens
    (a different number in each) attend among themselves, in order, as they do alone; the
    fillers that pad the sequences to the same count are neither attended nor added back.
    A graph that returns its keys (a cache kept outside it) is not routed: the fillers'
    rows would reach the cache unmarked."""
    torch.manual_seed(0)
    block, x = _CausalOutputOnly(mask).eval(), torch.randn(3, 11, 16)
    router = Router(torch.randn(16), 0.1, 1.0, 1)
    scores = x @ router.weight + router.bias
    cut = float(scores.median())
    (_, _, _, problem), routed = _route(block, (x,), _Plan(router, 0.5, cut, "selected"))
    kept, routed = scores >= cut, first_tensor(routed)
    assert problem == "" and len(set(kept.sum(1).tolist())) > 1
    assert torch.equal(routed[~kept], x[~kept])
    with torch.no_grad():
        for b in range(3):
            alone = block(x[b:b + 1, kept[b]])
            torch.testing.assert_close(routed[b, kept[b]], alone[0], rtol=1e-5, atol=1e-6)
    assert _route.rows[block.k.weight.data_ptr()] == [3 * int(kept.sum(1).max())]
    with pytest.raises(RuntimeError, match="without a cache this rewrite can mark"):
        _route(_CausalBlock(mask).eval(), (x,), _Plan(router, 0.5, cut, "selected"))


class _LlamaAttentionBlock(torch.nn.Module):
    """x + self_attn(norm(x)) of a Hugging Face Llama layer (RoPE, GQA, causal), its rotary
    angles computed outside the block as the model does."""

    def __init__(self):
        super().__init__()
        import transformers as tf
        from transformers.models.llama import modeling_llama as ml

        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64)
        cfg._attn_implementation = "sdpa"
        self.norm, self.attn = ml.LlamaRMSNorm(32), ml.LlamaAttention(cfg, 0)
        self.rotary = ml.LlamaRotaryEmbedding(cfg)

    def forward(self, x):
        angles = self.rotary(x, torch.arange(x.shape[1], device=x.device)[None])
        a, _ = self.attn(self.norm(x), position_embeddings=angles, attention_mask=None)
        return x + a


def test_a_llamas_routed_queries_get_their_own_rotary_angles():
    """keys="all" in a Llama: q_proj and RoPE run on the routed rows alone, so cos and sin
    must be selected at the routed positions of each sequence; the routed rows equal the
    unrouted block's."""
    torch.manual_seed(0)
    block, x = _LlamaAttentionBlock().eval(), torch.randn(3, 13, 32)
    router = Router(torch.randn(32), 0.1, 1.0, 1)
    scores = x @ router.weight + router.bias
    cut = float(scores.median())
    (_, _, problem, _), routed = _route(block, (x,), _Plan(router, 0.5, cut))
    assert problem == ""
    with torch.no_grad():
        full = block(x)
    kept, routed = scores >= cut, first_tensor(routed)
    assert len(set(kept.sum(1).tolist())) > 1
    assert torch.equal(routed[~kept], x[~kept])
    torch.testing.assert_close(routed[kept], full[kept], rtol=1e-5, atol=1e-6)
    q, k = (_route.rows[p.weight.data_ptr()] for p in (block.attn.q_proj, block.attn.k_proj))
    assert q == [3 * int(kept.sum(1).max())] and k == [39]
