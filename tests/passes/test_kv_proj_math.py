"""kv_proj's math against direct computation on data."""

import torch

from effc.passes.kv_proj_math import (pca_basis, pca_error, plane_error, plane_scores,
                                      plane_selection, query_plane_energy, round_rank)


def _data(g=3, n=500, d=8, seed=0):
    torch.manual_seed(seed)
    mix = torch.randn(g, d, d) * torch.logspace(0, -2, d)  # decaying spectrum per head
    return torch.randn(g, n, d) @ mix.transpose(1, 2)        # [G, N, d]


def test_pca_error_is_the_measured_reconstruction_error():
    x = _data().double()
    moment = x.transpose(1, 2) @ x / x.shape[1]
    for r in (1, 3, 8):
        p = pca_basis(moment, r).double()
        rec = x @ p @ p.transpose(1, 2)
        measured = ((x - rec).norm() / x.norm()).item()
        assert abs(pca_error(moment, r) - measured) <= 1e-6  # the basis is stored in fp32
    assert pca_error(moment, 8) == 0.0


def test_centered_pca_error_is_the_measured_error_and_never_above_the_uncentered():
    """Subtract the mean, project on the covariance's top-r, add the mean back: the error is
    what pca_errors(moment, mean) states, and at every rank no larger than without centering
    (on data with a large mean, much smaller)."""
    x = (_data() + torch.tensor([3.0, -2.0, 1.0, 0, 0, 0, 0, 0.5])).double()
    moment = x.transpose(1, 2) @ x / x.shape[1]
    mean = x.mean(1)  # [G, d]
    for r in range(0, 9):
        p = pca_basis(moment, r, mean).double()
        rec = (x - mean[:, None]) @ p @ p.transpose(1, 2) + mean[:, None]
        measured = ((x - rec).norm() / x.norm()).item()
        assert abs(pca_error(moment, r, mean) - measured) <= 1e-6
        assert pca_error(moment, r, mean) <= pca_error(moment, r) + 1e-12
    assert pca_error(moment, 2, mean) < 0.5 * pca_error(moment, 2)
    assert pca_error(moment, 8, mean) <= 1e-6


def test_plane_scores_are_the_energies_of_rotate_half_pairs():
    k = _data(d=8).double()
    moment = k.transpose(1, 2) @ k / k.shape[1]
    energy = (k[..., :4] ** 2 + k[..., 4:] ** 2).mean(1)  # [G, 4]: planes (i, i + 4)
    torch.testing.assert_close(plane_scores(moment), energy)
    q_energy = torch.rand(3, 4, dtype=torch.float64)
    torch.testing.assert_close(plane_scores(moment, q_energy), (energy * q_energy).sqrt())
    dropped = energy.sort(-1, descending=True).values[:, 2:].sum() / energy.sum()
    assert abs(plane_error(energy, 2) - dropped.sqrt().item()) <= 1e-12


def test_query_plane_energy_sums_a_kv_heads_query_heads():
    torch.manual_seed(0)
    heads, kv, d, inp = 4, 2, 6, 10
    w = torch.randn(heads * d, inp)
    x = torch.randn(300, inp).double()
    q = (x @ w.double().T).reshape(300, heads, d)
    per_head = (q[..., :3] ** 2 + q[..., 3:] ** 2).mean(0)         # [H, 3]
    want = per_head.reshape(kv, heads // kv, 3).sum(1)
    got = query_plane_energy(w, x.T @ x / 300, heads, kv)
    torch.testing.assert_close(got, want)


def test_plane_selection_keeps_rotate_half_pairing():
    scores = torch.tensor([[0.1, 5.0, 0.2, 3.0], [4.0, 0.0, 1.0, 2.0]])
    sel = plane_selection(scores, 2)  # [2, 8, 4]
    cols = sel.argmax(1)
    assert cols.tolist() == [[1, 3, 5, 7], [0, 3, 4, 7]]  # [planes, planes + d/2]
    assert torch.equal(sel.sum(1), torch.ones(2, 4))


def test_round_rank():
    assert [round_rank(r, 32, 8) for r in (0.5, 8, 9, 31, 40)] == [8, 8, 16, 32, 32]
    assert round_rank(3, 2, 4) == 2
