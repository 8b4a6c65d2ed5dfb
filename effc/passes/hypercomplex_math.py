"""The math of the hypercomplex pass, free of FX: Kronecker-sum fits and structure detection.

A weight M [m, K] (out x in; a conv's [out, in * k] with its kernel in the column blocks)
with n | m and n | in is a sum of T Kronecker products sum_t A_t kron S_t (A_t: n x n,
S_t: p x q', p = m / n, q' = K / n) exactly when its rearrangement
R[(i, j), (a, b)] = M[i p + a, j q' + b] ([n^2, p q']) has rank T (Van Loan & Pitsianis):
||M - sum_t A_t kron S_t||_F = ||R - sum_t vec(A_t) vec(S_t)^T||_F. So the truncated SVD of R
is the optimal T-term fit in Frobenius norm, its error at every T is the tail of R's
spectrum, and a trained PHM layer (T <= n) is recognized by that tail vanishing.

Activation-aware fit: the output error E||(M - M^) x||^2 = ||(M - M^) L||_F^2 (C = L L^T)
keeps Kronecker structure only if L does. C is replaced by its nearest Kronecker product
D kron E (the top singular pair of C rearranged the same way; positive definite for a
covariance), so with L_D L_D^T = D and L_E L_E^T = E the fit of M (L_D kron L_E) gives
A_t = A'_t L_D^-1, S_t = S'_t L_E^-1. Exact when C is a Kronecker product; the pass measures
the true output error of what it chose.
"""

from __future__ import annotations

import dataclasses

import torch

from effc.passes.low_rank_math import Factorization, factorize
from effc.passes.weight_sites import STRUCTURE_TOL

N_CHOICES = (2, 3, 4, 8, 16)
RIDGE = 1e-6  # relative to the mean diagonal of D and E before their Cholesky


def rearrange(matrix: torch.Tensor, n: int) -> torch.Tensor:
    """R [n^2, p q'] of M [n p, n q'] (Van Loan-Pitsianis): row (i, j), column (a, b)."""
    m, k = matrix.shape
    p, q = m // n, k // n
    return matrix.reshape(n, p, n, q).permute(0, 2, 1, 3).reshape(n * n, p * q)


def params(m: int, k: int, n: int, terms: int) -> int:
    """Parameters of a T-term Kronecker sum of an [m, k] weight."""
    return terms * (n * n + (m // n) * (k // n))


def max_terms(m: int, k: int, n: int, min_saving: float = 0.0) -> int:
    """The most terms that keep params <= (1 - min_saving) m k (and <= the rank of R)."""
    per = n * n + (m // n) * (k // n)
    return min(int((1 - min_saving) * m * k // per), n * n, (m // n) * (k // n))


@dataclasses.dataclass
class KroneckerFit:
    """Ordered Kronecker terms of one weight: the SVD of R (whitened or not) and the
    un-whitening, so that any prefix of T terms is the T-term fit."""

    fac: Factorization      # of R (or of the whitened R)
    n: int
    p: int
    q: int                  # columns per block (in / n times the conv kernel size)
    unwhiten: tuple[torch.Tensor, torch.Tensor] | None = None  # (L_D^-1, L_E^-1)

    @property
    def whitened(self) -> bool:
        return self.unwhiten is not None

    def tail_rel_error(self) -> torch.Tensor:
        """Relative error (of the weight, or the whitened one) at 0..rank(R) terms."""
        return self.fac.tail_rel_error()

    def factors(self, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a [T, n, n], s [T, p, q]) float64 of the T-term fit."""
        u, v = self.fac.factors(terms)
        a = u.T.reshape(terms, self.n, self.n)
        s = v.reshape(terms, self.p, self.q)
        if self.unwhiten is not None:
            d_inv, e_inv = self.unwhiten
            a, s = a @ d_inv, s @ e_inv
        return a, s

    def matrix(self, terms: int) -> torch.Tensor:
        """The [m, k] approximation with T terms."""
        a, s = self.factors(terms)
        return kron_sum(a, s)


def kron_sum(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sum_t a_t kron s_t as an [n p, n q] matrix."""
    terms, n, _ = a.shape
    _, p, q = s.shape
    return torch.einsum("tij,tab->iajb", a, s).reshape(n * p, n * q)


def nearest_kronecker(c: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(D [n, n], E [q, q]) with D kron E nearest to the symmetric PSD C [n q, n q], both
    symmetric positive definite (a small ridge keeps them invertible)."""
    r = rearrange(c.double(), n)
    u, sv, vh = torch.linalg.svd(r, full_matrices=False)
    q = c.shape[0] // n
    d = (u[:, 0] * sv[0].sqrt()).reshape(n, n)
    e = (vh[0] * sv[0].sqrt()).reshape(q, q)
    if d.diagonal().sum() < 0:  # the pair is defined up to a common sign
        d, e = -d, -e
    d, e = (d + d.T) / 2, (e + e.T) / 2
    out = []
    for f in (d, e):
        lam, vec = torch.linalg.eigh(f)
        floor = RIDGE * lam.clamp_min(0).mean().clamp_min(1e-30)
        out.append((vec * lam.clamp_min(floor)) @ vec.T)
    return out[0], out[1]


def kronecker_fit(matrix: torch.Tensor, n: int, moment: torch.Tensor | None = None
                  ) -> KroneckerFit:
    """The ordered Kronecker terms of `matrix` [m, k] (n | m, n | k), whitened by the nearest
    Kronecker factorization of `moment` (E[x x^T], [k, k]) when given."""
    mat = matrix.double()
    m, k = mat.shape
    if m % n or k % n:
        raise ValueError(f"n={n} must divide both dimensions of the weight ({m}x{k})")
    p, q = m // n, k // n
    if moment is None:
        return KroneckerFit(factorize(rearrange(mat, n)), n, p, q)
    d, e = nearest_kronecker(moment.to(mat.device), n)
    l_d, l_e = torch.linalg.cholesky(d), torch.linalg.cholesky(e)
    white = torch.einsum("mjb,jJ,bB->mJB", mat.reshape(m, n, q), l_d, l_e).reshape(m, k)
    eye_d = torch.eye(n, dtype=mat.dtype, device=mat.device)
    eye_e = torch.eye(q, dtype=mat.dtype, device=mat.device)
    unwhiten = (torch.linalg.solve_triangular(l_d, eye_d, upper=False),
                torch.linalg.solve_triangular(l_e, eye_e, upper=False))
    return KroneckerFit(factorize(rearrange(white, n)), n, p, q, unwhiten)


def kronecker_structure(matrix: torch.Tensor, choices=N_CHOICES, in_features: int | None = None
                        ) -> tuple[KroneckerFit, int] | None:
    """(fit, T) of the cheapest exact Kronecker-sum form of `matrix` with T <= n terms, or
    None if no n in `choices` gives one. `in_features`: the weight's input channels when
    the columns also hold a conv kernel (n must divide them)."""
    m, k = matrix.shape
    cin = in_features if in_features is not None else k
    best = None
    for n in choices:
        if m % n or cin % n or n * n > m * k:
            continue
        fit = kronecker_fit(matrix, n)
        err = fit.tail_rel_error()
        ok = (err[: n + 1] <= STRUCTURE_TOL).nonzero()
        if not len(ok):
            continue
        terms = max(int(ok[0].item()), 1)
        cost = params(m, k, n, terms)
        if cost < m * k and (best is None or cost < params(m, k, best[0].n, best[1])):
            best = (fit, terms)
    return best
