"""attention_sites: the projections behind an attention's q, k, v, and the merge of its
output into the output projection (used by kv_proj's folds, tests/passes/test_kv_proj.py)."""

import pytest
import torch
import torch.fx as fx

from effc.passes.attention_sites import NOT_HEADS, heads_part, merge_chain

B, T, H, D = 2, 5, 4, 8  # batch, tokens, heads, head dim


@pytest.mark.parametrize("merge,ok", [
    (lambda a: a.transpose(1, 2).reshape(2, 5, -1), True),        # Llama's
    (lambda a: a.permute(0, 2, 1, 3).contiguous().flatten(-2), True),
    (lambda a: a.reshape(2, 5, -1), False),                       # heads and tokens mixed
    (lambda a: a.transpose(2, 3).transpose(1, 2).flatten(-2), False),  # d-major merge
])
def test_the_output_projection_is_found_only_behind_reshapes_that_merge_the_heads(merge, ok):
    """The output fold assumes o_proj reads transpose(1, 2).flatten(-2) of [B, H, T, d]: the
    chain in between is run on positions to check that, and anything else is left alone."""
    gm = fx.symbolic_trace(lambda a, w: torch.nn.functional.linear(merge(a), w))
    a = next(n for n in gm.graph.nodes if n.op == "placeholder")
    found = merge_chain(a, torch.Size([2, 4, 5, 8]))
    assert isinstance(found, tuple) == ok
    if ok:
        assert found[1].call.target is torch.nn.functional.linear and not found[1].io
    else:
        assert "more than merge the heads" in found


def test_gpt2s_merge_into_an_addmm_is_found():
    """Conv1D's c_proj reads the heads merged and the tokens flattened."""
    gm = fx.symbolic_trace(lambda a, w, b: torch.addmm(
        b, a.transpose(1, 2).contiguous().reshape(2, 5, -1).view(-1, 32), w))
    a = next(n for n in gm.graph.nodes if n.op == "placeholder")
    found = merge_chain(a, torch.Size([2, 4, 5, 8]))
    assert not isinstance(found, str) and found[1].io and found[1].call.target is torch.addmm


def test_rotated_queries_are_not_a_projection_split_into_heads():
    """With RoPE (any op after the heads' transpose) the queries cannot fold: said why."""
    from tests.lowering_helpers import traced

    gm = traced(lambda x, w: torch.nn.functional.linear(x, w).view(B, T, -1, D)
                .transpose(1, 2) * 2.0, torch.randn(B, T, 32), torch.randn(H * D, 32))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert heads_part(out) == NOT_HEADS
    assert heads_part(out.args[0]).proj.w.name == "w"  # the heads themselves are found
