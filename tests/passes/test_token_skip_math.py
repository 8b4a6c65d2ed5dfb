"""token_skip's math against direct computation."""

import torch

from effc.passes.token_skip_math import (MARK, arank, cached_rows_mask, compact_rows_mask,
                                        fit_router, kept_tokens, overlap, per_sequence,
                                        marked_rows, routed_of, select_along, spread_rows,
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


def _routing():
    """Three sequences of 6 tokens routing 2, 0 and 4 of them (flat indices)."""
    routed = torch.tensor([[0, 1, 0, 0, 1, 0], [0] * 6, [1, 1, 0, 1, 0, 1]], dtype=torch.bool)
    return routed, routed.reshape(-1).nonzero().view(-1)


def test_spread_rows_puts_routed_rows_at_their_tokens_and_marks_every_other_row():
    """A routed layer's new cache rows at batch > 1: the routed rows at their tokens' rows;
    fillers and skipped tokens hold zero keys and marked values (MARK twice, then zeros)."""
    torch.manual_seed(0)
    routed, index = _routing()
    positions, weight, _ = per_sequence(index, 3, 6)
    assert positions.shape == (3, 4)
    rows = torch.randn(3, 2, 4, 5)  # [B, heads, K, d]
    keys = spread_rows(rows, positions, weight, 6, True)
    values = spread_rows(rows, positions, weight, 6, False)
    assert keys.shape == values.shape == (3, 2, 6, 5)
    assert torch.equal(marked_rows(values), ~routed)
    blank = torch.zeros(2, 5)
    blank[0, :2] = MARK
    for b in range(3):
        at = positions[b, :int(routed[b].sum())]  # routed first, in order
        assert torch.equal(keys[b][:, at], rows[b, :, :len(at)])
        assert torch.equal(values[b][:, at], rows[b, :, :len(at)])
        assert not keys[b][:, ~routed[b]].any()
        assert all(torch.equal(values[b][:, t], blank) for t in (~routed[b]).nonzero().view(-1))
    for dtype in (torch.float16, torch.bfloat16):  # the marker survives the dtype
        assert torch.equal(marked_rows(spread_rows(rows.to(dtype), positions, weight, 6, False)),
                           ~routed)
    # the routed rows of the [B * K] layout, in the order of the flat indices
    assert torch.equal(positions.reshape(-1)[routed_of(weight)] + torch.arange(3).repeat_interleave(
        4)[routed_of(weight)] * 6, index)


def test_cached_rows_mask_is_the_models_rows_with_the_marked_rows_hidden():
    torch.manual_seed(0)
    positions = torch.tensor([[1, 3], [0, 2]])
    hidden = torch.rand(2, 9) < 0.3  # 5 cached rows, then this call's 4 tokens
    got = cached_rows_mask(None, positions, hidden, 4)
    want = torch.zeros(2, 1, 2, 9, dtype=torch.bool)
    for b in range(2):
        for i in range(2):
            for j in range(9):  # causal: up to the query's own token, after the 5 cached
                want[b, 0, i, j] = j <= 5 + positions[b, i] and not hidden[b, j]
    assert torch.equal(got, want)
    model = torch.rand(2, 1, 4, 9) < 0.7  # the model's mask: a row per token
    assert torch.equal(cached_rows_mask(model, positions, hidden, 4),
                       torch.stack([model[b, :, positions[b]] for b in range(2)])
                       & ~hidden[:, None, None])
    additive = torch.zeros(2, 1, 1, 9).masked_fill(model[:, :, :1], torch.finfo().min)
    assert torch.equal(cached_rows_mask(additive, positions[:, :1], hidden, 1),
                       ~model[:, :, :1] & ~hidden[:, None, None])  # a decode step's one row


def test_compact_rows_mask_is_causal_among_the_routed_rows_and_hides_fillers():
    routed, index = _routing()
    positions, weight, _ = per_sequence(index, 3, 6)
    got = compact_rows_mask(None, positions, weight)
    n = routed.sum(1)
    for b in range(3):
        for i in range(4):
            for j in range(4):
                assert bool(got[b, 0, i, j]) == (j <= i and j < n[b])
    pad = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    pad[2, ..., 0] = False  # sequence 2's first token is padding
    masked = compact_rows_mask(pad, positions, weight)
    assert not masked[2, 0, :, 0].any() and torch.equal(masked[:2], got[:2])
    assert torch.equal(masked[2, 0, :, 1:], got[2, 0, :, 1:])
