"""Kronecker-sum math: exact recovery, the fit's error is the discarded spectrum, whitening."""

import pytest
import torch

from effc.compiler.metrics import matrix_rel_error as output_rel_error
from effc.passes.hypercomplex_math import (kron_sum, kronecker_fit, kronecker_structure,
                                           max_terms, params)


def _kron_loop(a, s):
    """sum_t torch.kron(a_t, s_t): an oracle independent of the einsum in kron_sum."""
    return sum(torch.kron(a[t], s[t]) for t in range(a.shape[0]))


def _rearranged_by_loops(m, n):
    """R[(i, j), (a, b)] = M[i p + a, j q + b], built element block by block."""
    p, q = m.shape[0] // n, m.shape[1] // n
    return torch.stack([m[i * p:(i + 1) * p, j * q:(j + 1) * q].reshape(-1)
                        for i in range(n) for j in range(n)])


@pytest.mark.parametrize("n,terms,p,q", [(2, 1, 3, 5), (2, 2, 8, 4), (3, 2, 4, 7),
                                         (4, 4, 6, 5), (4, 3, 16, 8), (8, 8, 4, 4)])
def test_kronecker_sums_are_recovered_exactly_with_their_n_and_terms(n, terms, p, q):
    g = torch.Generator().manual_seed(n * 100 + terms)
    a = torch.randn(terms, n, n, generator=g, dtype=torch.float64)
    s = torch.randn(terms, p, q, generator=g, dtype=torch.float64)
    w = _kron_loop(a, s)
    assert torch.allclose(kron_sum(a, s), w, atol=1e-12)
    found = kronecker_structure(w.float())
    assert found is not None
    fit, t = found
    assert t <= terms
    assert params(*w.shape, fit.n, t) <= params(*w.shape, n, terms)
    assert (fit.matrix(t) - w).norm() / w.norm() < 1e-6


def test_a_conv_weight_is_a_kronecker_sum_over_its_channels():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, 4, generator=g, dtype=torch.float64)
    s = torch.randn(4, 6, 3, 3, 3, generator=g, dtype=torch.float64)
    w = torch.stack([torch.stack([_kron_loop(a, s[:, :, :, i, j]) for j in range(3)], -1)
                     for i in range(3)], -2)          # [24, 12, 3, 3]
    matrix = w.reshape(24, -1)
    fit, t = kronecker_structure(matrix, in_features=12)
    assert (fit.n, t) == (4, 4)
    assert torch.allclose(fit.matrix(t), matrix, atol=1e-10)
    assert kronecker_structure(matrix, in_features=12, choices=(8,)) is None  # 8 does not divide 12


def test_dense_weights_are_not_taken_for_kronecker_sums():
    g = torch.Generator().manual_seed(2)
    assert kronecker_structure(torch.randn(64, 48, generator=g)) is None


@pytest.mark.parametrize("n", [2, 4, 8])
def test_fit_error_is_the_discarded_singular_values(n):
    g = torch.Generator().manual_seed(n)
    m = torch.randn(48, 64, generator=g, dtype=torch.float64)
    fit = kronecker_fit(m, n)
    sv = torch.linalg.svdvals(_rearranged_by_loops(m, n))
    curve = fit.tail_rel_error()
    for t in range(1, min(n * n, 6)):
        discarded = sv[t:].pow(2).sum().sqrt() / m.norm()
        measured = (m - fit.matrix(t)).norm() / m.norm()
        assert curve[t].item() == pytest.approx(discarded.item(), rel=1e-9)
        assert measured.item() == pytest.approx(discarded.item(), rel=1e-9)
    assert curve[-1].item() < 1e-12   # rank(R) <= n^2 terms reproduce any weight


def test_more_terms_never_hurt_and_cost_what_the_formula_says():
    m = torch.randn(32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    err = kronecker_fit(m, 4).tail_rel_error()
    assert all(err[t + 1] <= err[t] + 1e-15 for t in range(16))
    assert params(32, 32, 4, 3) == 3 * (16 + 8 * 8)
    assert max_terms(32, 32, 4) == 12  # 12 * 80 = 960 <= 1024 < 13 * 80
    assert max_terms(32, 32, 4, min_saving=0.5) == 6


def test_whitened_fit_lowers_the_output_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(4)
    m = torch.randn(32, 48, generator=g, dtype=torch.float64)
    scale = torch.logspace(-2, 1, 48, dtype=torch.float64)
    x = torch.randn(2000, 48, generator=g, dtype=torch.float64) * scale
    c = x.T @ x / x.shape[0]
    plain, white = kronecker_fit(m, 4), kronecker_fit(m, 4, c)
    for t in (2, 4, 8):
        measured = {name: ((x @ (m - f.matrix(t)).T).norm() / (x @ m.T).norm()).item()
                    for name, f in (("plain", plain), ("white", white))}
        assert measured["white"] < 0.9 * measured["plain"], (t, measured)
        assert output_rel_error(m, white.matrix(t), c) == pytest.approx(measured["white"],
                                                                        rel=1e-9)
