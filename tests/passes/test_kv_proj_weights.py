"""kv_proj_weights: the value bases folded into v_proj and o_proj (exactness in generation
is tested with the pass, tests/passes/test_kv_proj.py)."""

import pytest
import torch
import torch.fx as fx

from effc.passes.kv_proj_weights import merge_chain, worth_it


@pytest.mark.parametrize("merge,ok", [
    (lambda a: a.transpose(1, 2).reshape(2, 5, -1), True),        # Llama's
    (lambda a: a.permute(0, 2, 1, 3).contiguous().flatten(-2), True),
    (lambda a: a.reshape(2, 5, -1), False),                       # heads and tokens mixed
    (lambda a: a.transpose(2, 3).transpose(1, 2).flatten(-2), False),  # d-major merge
])
def test_o_proj_folds_only_behind_reshapes_that_merge_the_heads(merge, ok):
    """The output fold assumes o_proj reads transpose(1, 2).flatten(-2) of [B, H, T, d]: the
    chain in between is run on positions to check that, and anything else is left alone."""
    gm = fx.symbolic_trace(lambda a, w: torch.nn.functional.linear(merge(a), w))
    a = next(n for n in gm.graph.nodes if n.op == "placeholder")
    found = merge_chain(a, torch.Size([2, 4, 5, 8]))
    assert isinstance(found, tuple) == ok
    if ok:
        assert found[1].target is torch.nn.functional.linear
    else:
        assert "more than merge the heads" in found



def test_only_graphs_with_enough_tokens_are_worth_folding():
    """Folding costs about d r token-projections; it saves d - r per projected token."""
    assert worth_it(tokens=65, d=64, r=32) and not worth_it(tokens=64, d=64, r=32)
    assert not worth_it(tokens=1, d=128, r=16)  # a decode step
