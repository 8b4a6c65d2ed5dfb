"""The math of the low_rank pass, free of FX: factorize, measure, choose and allocate ranks.

A weight M [m, n] (out x in) becomes u [m, r] @ v [r, n]. Without data, truncated SVD
minimizes ||M - uv||_F. With the input second moment C = E[x x^T] it minimizes the output
error E||(M - uv) x||^2 = ||(M - uv) L||_F^2 where C = L L^T (SVD-LLM): SVD of M L, then
un-whiten with L^{-1}. Either way the factors are ordered by importance, so a smaller rank
is a prefix and the error of every rank is known from the singular values at no extra cost.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from effc.compiler.metrics import sqnr_db


@dataclasses.dataclass
class Factorization:
    """Ordered factors of one weight, with the spectrum the rank choice reads."""

    u: torch.Tensor          # [m, k] float64, columns scaled by sqrt(s)
    v: torch.Tensor          # [k, n] float64, rows scaled by sqrt(s)
    s: torch.Tensor          # [k] singular values of M (plain) or M L (whitened), descending
    whitened: bool

    def tail_rel_error(self) -> torch.Tensor:
        """[k+1] relative error (of the weight, or of the output when whitened) at rank 0..k."""
        energy = self.s.double().pow(2)
        tail = energy.flip(0).cumsum(0).flip(0)
        tail = torch.cat([tail, tail.new_zeros(1)])
        return (tail / energy.sum().clamp_min(1e-300)).sqrt()

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.u[:, :rank], self.v[:rank]


def cholesky_factor(moment: torch.Tensor, max_tries: int = 8) -> torch.Tensor:
    """Lower L with L L^T = moment (+ jitter): float64, jitter grown until positive definite."""
    c = moment.double()
    c = (c + c.T) / 2
    scale = c.diagonal().abs().mean().clamp_min(1e-12).item()
    jitter = 0.0
    for i in range(max_tries):
        eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        L, info = torch.linalg.cholesky_ex(c + jitter * eye)
        if info.item() == 0:
            return L
        jitter = scale * 10.0 ** (i - 8)
    raise RuntimeError("input second moment is not positive definite even with jitter")


def factorize(weight: torch.Tensor, moment: torch.Tensor | None = None) -> Factorization:
    """Plain (moment None) or activation-aware (SVD-LLM) factorization, in float64."""
    m = weight.detach().double()
    if moment is None:
        p, s, qh = torch.linalg.svd(m, full_matrices=False)
        root = s.sqrt()
        return Factorization(p * root, root[:, None] * qh, s, whitened=False)
    L = cholesky_factor(moment.to(m.device))
    p, s, qh = torch.linalg.svd(m @ L, full_matrices=False)
    root = s.sqrt()
    # v = sqrt(s) Q^T L^{-1}: solve L^T v^T = Q sqrt(s) instead of inverting L.
    v = torch.linalg.solve_triangular(L.T, (qh.T * root), upper=True).T
    return Factorization(p * root, v, s, whitened=True)


def weight_error(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error and SQNR of u @ v against the weight."""
    w = weight.detach().double()
    diff, ref = (w - u.double() @ v.double()).norm().item(), w.norm().item()
    return {"weight_rel_fro": diff / ref if ref else 0.0, "weight_sqnr_db": sqnr_db(ref, diff)}


def output_error(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                 moment: torch.Tensor) -> dict[str, float]:
    """Expected layer-output error over the calibration inputs (bias excluded), from C alone.

    ||Mx||^2, ||(M-uv)x||^2 and <Mx, uvx> averaged over inputs are traces against C = E[xx^T].
    """
    w = weight.detach().double()
    approx = u.double() @ v.double()
    c = moment.double().to(w.device)
    ref2 = torch.einsum("ij,jk,ik->", w, c, w).item()
    out2 = torch.einsum("ij,jk,ik->", approx, c, approx).item()
    err = w - approx
    diff2 = max(torch.einsum("ij,jk,ik->", err, c, err).item(), 0.0)
    dot = torch.einsum("ij,jk,ik->", w, c, approx).item()
    ref, diff = math.sqrt(max(ref2, 0.0)), math.sqrt(diff2)
    cosine = dot / math.sqrt(ref2 * out2) if ref2 > 0 and out2 > 0 else float(ref2 == out2)
    return {"out_rel_fro": diff / ref if ref else 0.0, "out_cosine": cosine,
            "out_sqnr_db": sqnr_db(ref, diff)}


def round_rank(rank: int, multiple: int, full: int) -> int:
    """Round up to a multiple (kernels like multiples of 8/16), never above full rank."""
    return min(full, max(multiple, math.ceil(rank / multiple) * multiple))


def max_profitable_rank(m: int, n: int, min_saving: float) -> int:
    """Largest r with r (m + n) <= (1 - min_saving) m n."""
    return int(math.floor((1.0 - min_saving) * m * n / (m + n)))


@dataclasses.dataclass
class BudgetSite:
    """One site's options for the global allocator: its error curve and sizes."""

    key: str
    m: int
    n: int
    rel_error: torch.Tensor   # [k+1] relative error at each rank
    max_rank: int             # largest profitable rank (multiple-rounded down)


def allocate(sites: list[BudgetSite], budget: float, multiple: int) -> dict[str, int | None]:
    """Ranks that keep at most `budget` parameters in all, spending them where error drops most.

    Greedy on marginal gain: every site starts at the smallest rank (`multiple`); each step
    buys the move with the largest reduction of squared relative error per parameter, where a
    move is "rank + multiple" or, at the largest profitable rank, "keep the weight dense"
    (None). Singular-value tails are convex, so the greedy order is near-optimal.
    """
    rank = {s.key: min(multiple, s.max_rank) for s in sites}
    spent = sum(rank[s.key] * (s.m + s.n) for s in sites)
    if spent > budget:
        raise ValueError(f"param_budget too small: the smallest rank ({multiple}) at every "
                         f"site needs {spent} parameters, the budget allows {int(budget)}")
    dense: set[str] = set()

    def move(s: BudgetSite) -> tuple[float, int] | None:
        r = rank[s.key]
        if s.key in dense:
            return None
        err2 = s.rel_error.double().pow(2)
        if r + multiple <= s.max_rank:
            cost = multiple * (s.m + s.n)
            return (err2[r] - err2[r + multiple]).item() / cost, cost
        cost = s.m * s.n - r * (s.m + s.n)
        return err2[r].item() / max(cost, 1), cost

    while True:
        options = [(mv, s) for s in sites if (mv := move(s)) is not None and spent + mv[1] <= budget]
        if not options:
            break
        (gain, cost), best = max(options, key=lambda t: t[0][0])
        if gain <= 0.0:
            break
        spent += cost
        if rank[best.key] + multiple <= best.max_rank:
            rank[best.key] += multiple
        else:
            dense.add(best.key)
    return {k: (None if k in dense else r) for k, r in rank.items()}
