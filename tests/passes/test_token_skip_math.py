"""token_skip's math against direct computation."""

import torch

from effc.passes.token_skip_math import (arank, fit_router, kept_tokens, overlap, select_along,
                                        threshold)


def test_the_ridge_router_recovers_a_linear_target():
    torch.manual_seed(0)
    x = torch.randn(2000, 16)
    w, b = torch.randn(16), 0.7
    r = fit_router(x, x @ w + b)
    assert torch.allclose(r.weight, w, atol=1e-2) and abs(r.bias - b) < 1e-2
    assert r.r2 > 0.999 and r.tokens == 2000
    torch.testing.assert_close(r.scores(x).float(), x @ w + b, atol=2e-2, rtol=0)


def test_threshold_keeps_the_capacity_share_of_tokens():
    scores = torch.randn(10_000, dtype=torch.float64)
    for c in (0.125, 0.5, 0.875):
        kept = (scores >= threshold(scores, c)).double().mean().item()
        assert kept == kept_tokens(10_000, c) / 10_000
    assert threshold(scores, 1.0) == float("-inf") and threshold(scores, 0.0) == float("inf")


def test_overlap_counts_the_oracles_top_tokens_the_router_keeps():
    oracle = torch.arange(10.0)
    assert overlap(oracle, oracle, 0.3) == 1.0
    assert overlap(-oracle, oracle, 0.3) == 0.0
    router = oracle.clone()
    router[0] = 100.0                      # keeps tokens 0 and 9; the oracle 9 and 8
    assert overlap(router, oracle, 0.2) == 0.5


def test_arank_is_the_mean_normalized_rank_without_the_diagonal():
    eye = torch.eye(6).expand(2, 6, 6)   # attends to itself only: nothing left off-diagonal
    assert arank([eye]) == 0.0
    first = torch.zeros(2, 6, 6)
    first[..., 0] = 1.0                  # every query attends to token 0: rank 1
    assert abs(arank([first]) - 1 / 6) < 1e-12
    full = torch.rand(2, 6, 6) + 0.1     # generic maps: full rank
    assert abs(arank([full, first]) - (1.0 + 1 / 6) / 2) < 1e-12


def test_select_along_picks_each_sequences_positions_on_any_token_axis():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 7, 3)  # batch 1, broadcast to the positions' 2 sequences
    positions = torch.tensor([[0, 4, 6], [5, 1, 2]])
    picked = select_along(x, 2, positions)
    assert picked.shape == (2, 2, 3, 3)
    for b in range(2):
        assert torch.equal(picked[b], x[0][:, positions[b]])
    y = torch.randn(2, 7, 4, 3)  # tokens on axis 1
    assert torch.equal(select_along(y, 1, positions)[1], y[1, positions[1]])
