"""The math of the low_rank pass, free of FX: factorize, measure, choose and allocate ranks.

A weight M [m, n] (out x in) becomes u [m, r] @ v [r, n]. Without data, truncated SVD
minimizes ||M - uv||_F. With the input second moment C = E[x x^T] it minimizes the output
error E||(M - uv) x||^2 = ||(M - uv) L||_F^2 where C = L L^T (SVD-LLM): SVD of M L, then
un-whiten with L^{-1}. Either way the factors are ordered by importance, so a smaller rank
is a prefix and the error of every rank is known from the singular values at no extra cost.

A full SVD of a 4096 x 11008 matrix takes tens of seconds on a CPU, so when the rank is fixed
in advance and small, only the top factors are computed with a randomized range finder
(Halko, Martinsson & Tropp 2011). Their error is still exact: the factors are an orthogonal
projection P A of A (= M, or M L), so ||A - P A||^2 = ||A||^2 - sum of the kept s_i^2.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from effc.compiler.calibration.statistics import shrink
from effc.compiler.metrics import sqnr_db

SVD_METHODS = ("auto", "full", "randomized")
# "auto" sketches only where it clearly pays: a full SVD of 1024 x 1024 takes 0.4 s, and at
# 2048 x 2048 (one thread) the sketch is 3.2x faster at r = n/4, 1.8x at 3n/8, even at n/2.
RANDOMIZED_MIN_DIM = 1024
RANDOMIZED_MAX_FRACTION = 0.25
# Sketch width r + max(OVERSAMPLE_MIN, OVERSAMPLE * r), POWER_ITERS rounds of subspace
# iteration in SKETCH_DTYPE, then a float64 projection. Measured at r = min(m, n) / 4: error
# <= 1.009x the optimum on power-law spectra and trained weights, 1.010x on pure Gaussian noise
# (the flattest spectrum); 2 rounds or 10 % oversampling give up to 1.03x. Sketching in
# float64 is no more accurate, only slower.
OVERSAMPLE = 0.2
OVERSAMPLE_MIN = 16
POWER_ITERS = 3
SKETCH_DTYPE = torch.float32


@dataclasses.dataclass
class Factorization:
    """Ordered factors of one weight, with the spectrum the rank choice reads.

    `s` is the whole spectrum (method "full") or only its top k values (method "randomized");
    then `total_energy` = ||A||_F^2 gives the error of every rank up to k, and no further.
    """

    u: torch.Tensor          # [m, k] float64, columns scaled by sqrt(s)
    v: torch.Tensor          # [k, n] float64, rows scaled by sqrt(s)
    s: torch.Tensor          # [k] singular values of M (plain) or M L (whitened), descending
    whitened: bool
    method: str = "full"     # "full" | "randomized"
    total_energy: float | None = None   # ||A||_F^2 when s is truncated

    @property
    def complete(self) -> bool:
        """Whether s is the whole spectrum (so the error of every rank is known)."""
        return self.total_energy is None

    @property
    def known_rank(self) -> int:
        """The largest rank whose factors and error this factorization holds."""
        return self.s.shape[0]

    def tail_rel_error(self) -> torch.Tensor:
        """[k+1] relative error (of the weight, or of the output when whitened) at rank 0..k."""
        energy = self.s.double().pow(2)
        if self.total_energy is None:
            tail = energy.flip(0).cumsum(0).flip(0)
            tail = torch.cat([tail, tail.new_zeros(1)])
            total = energy.sum()
        else:
            total = torch.tensor(self.total_energy, dtype=torch.float64, device=energy.device)
            kept = torch.cat([energy.new_zeros(1), energy.cumsum(0)])
            tail = (total - kept).clamp_min(0.0)
        return (tail / total.clamp_min(1e-300)).sqrt()

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rank > self.known_rank:
            raise ValueError(f"rank {rank} asked of a factorization that holds {self.known_rank}")
        return self.u[:, :rank], self.v[:rank]


def svd_method(m: int, n: int, rank: int | None, method: str = "auto") -> str:
    """Which factorization runs: "full", or "randomized" (only for a rank fixed in advance)."""
    if method not in SVD_METHODS:
        raise ValueError(f"svd method {method!r}: accepted values are {', '.join(SVD_METHODS)}")
    if method == "randomized" and rank is None:
        raise ValueError("a randomized SVD needs the rank in advance")
    if method != "auto":
        return method
    full = min(m, n)
    if rank is not None and full >= RANDOMIZED_MIN_DIM and rank <= RANDOMIZED_MAX_FRACTION * full:
        return "randomized"
    return "full"


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


def range_basis(a: torch.Tensor, width: int, iters: int | None = None,
                dtype: torch.dtype | None = None, seed: int = 0) -> torch.Tensor:
    """Orthonormal [m, width] basis close to A's top left singular space.

    Gaussian sketch A @ Omega, then `iters` rounds of subspace iteration (A A^T); every product
    is re-orthonormalized, else in float32 the small directions drown in the large ones. The
    seed is fixed so that compiling twice gives the same factors.
    """
    iters = POWER_ITERS if iters is None else iters
    dtype = SKETCH_DTYPE if dtype is None else dtype
    gen = torch.Generator(device=a.device).manual_seed(seed)
    x = a.to(dtype)
    omega = torch.randn(x.shape[1], width, generator=gen, dtype=dtype, device=a.device)
    q = torch.linalg.qr(x @ omega).Q
    for _ in range(iters):
        q = torch.linalg.qr(x.T @ q).Q
        q = torch.linalg.qr(x @ q).Q
    return q


def _ritz(q: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """Best rank-`rank` factors within span(q), given b = q^T A (float64): (basis, s, w).

    With G = b b^T = E diag(lambda) E^T (descending), basis = q E and w = E^T b, so
    basis[:, :j] @ w[:j] = P_j A, an orthogonal projection of A. s is measured as the row norms
    of w, not read off lambda, so that sum of s_i^2 = ||P_j A||^2 holds to float64 precision.
    """
    _, e = torch.linalg.eigh(b @ b.T)
    e = e.flip(1)[:, :rank]
    w = e.T @ b
    return q @ e, w.norm(dim=1), w


def _inv_root(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s.rsqrt(), torch.zeros_like(s))


def _randomized(m: torch.Tensor, L: torch.Tensor | None, rank: int) -> Factorization:
    """Top-`rank` factors of A = M (L None) or M L from a sketch, with the exact total energy."""
    a = m if L is None else m @ L
    width = min(rank + max(OVERSAMPLE_MIN, math.ceil(OVERSAMPLE * rank)), *a.shape)
    q = torch.linalg.qr(range_basis(a, width).double()).Q    # float64 re-orthonormalization
    basis, s, w = _ritz(q, q.T @ a, rank)
    root = s.sqrt()
    u, v = basis * root, w * _inv_root(s)[:, None]
    if L is not None:  # v L = w / sqrt(s): solve for v instead of inverting L
        v = torch.linalg.solve_triangular(L.T, v.T, upper=True).T
    total = a.pow(2).sum().item()
    return Factorization(u, v, s, whitened=L is not None, method="randomized", total_energy=total)


@dataclasses.dataclass(frozen=True)
class OutputMetric:
    """G^1/2 and G^-1/2 of an SPD output metric G [m, m], from one eigendecomposition (a head
    is factorized up to three times: its fit, its held-out fit, its compensated refit)."""

    root: torch.Tensor
    inv_root: torch.Tensor

    @classmethod
    def of(cls, metric: torch.Tensor) -> OutputMetric:
        ev, q = torch.linalg.eigh(metric.double())
        r = ev.clamp_min(ev.max() * 1e-12).sqrt()
        return cls((q * r) @ q.T, (q / r) @ q.T)


def factorize(weight: torch.Tensor, moment: torch.Tensor | None = None, rank: int | None = None,
              method: str = "auto", out_metric: OutputMetric | None = None) -> Factorization:
    """Plain (moment None) or activation-aware (SVD-LLM) factorization, in float64.

    With `rank` given (a rank chosen before the spectrum is known), `method` "auto" computes
    only the top-`rank` factors of a large matrix (see `svd_method`); otherwise full SVD.
    `out_metric` (of G, SPD [m, m]) weighs the output error too: the truncation minimizes
    E ||G^1/2 (W - A) x||^2, so errors go where G is small (see `softmax_fisher`).
    """
    if out_metric is not None:
        dev = weight.device
        fac = factorize(out_metric.root.to(dev) @ weight.detach().double(), moment,
                        method="full")
        fac.u = out_metric.inv_root.to(dev) @ fac.u
        return fac
    m = weight.detach().double()
    L = None if moment is None else cholesky_factor(moment.to(m.device))
    if svd_method(*m.shape, rank, method) == "randomized":
        return _randomized(m, L, min(rank, *m.shape))
    if L is None:
        p, s, qh = torch.linalg.svd(m, full_matrices=False)
        root = s.sqrt()
        return Factorization(p * root, root[:, None] * qh, s, whitened=False)
    p, s, qh = torch.linalg.svd(m @ L, full_matrices=False)
    root = s.sqrt()
    # v = sqrt(s) Q^T L^{-1}: solve L^T v^T = Q sqrt(s) instead of inverting L.
    v = torch.linalg.solve_triangular(L.T, (qh.T * root), upper=True).T
    return Factorization(p * root, v, s, whitened=True)


def softmax_fisher(logits: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """E[diag(p) - p p^T] over rows of `logits` [N, m] (p = softmax), scaled to trace m and
    shrunk toward I: the metric of the second-order KL between the output distributions, so a
    head's truncation spends its rank on the classes the data actually puts mass on."""
    p = logits.double().softmax(-1)
    f = torch.diag(p.mean(0)) - p.T @ p / p.shape[0]
    f = f * (f.shape[0] / f.trace().clamp_min(1e-30))
    return shrink(f, shrinkage)


def weight_error(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None
                 ) -> dict[str, float]:
    """Relative Frobenius error and SQNR of u @ v (of u itself when v is None: any other
    approximation of the weight) against the weight."""
    w = weight.detach().double()
    approx = u.double() if v is None else u.double() @ v.double()
    diff, ref = (w - approx).norm().item(), w.norm().item()
    return {"weight_rel_fro": diff / ref if ref else 0.0, "weight_sqnr_db": sqnr_db(ref, diff)}


def output_error_curve(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                       moment: torch.Tensor) -> torch.Tensor:
    """[k+1] relative output error of u[:, :r] @ v[:r] for r = 0..k, against C = E[x x^T]:
    the error curve of a factorization fitted with another metric (a shrunk C, an output
    weighting), from one W C (m n^2) and prefix sums over the factor pairs."""
    w, c = weight.detach().double(), moment.double().to(weight.device)
    u, v = u.double(), v.double()
    wc = w @ c
    ref2 = (wc * w).sum()
    dot = ((wc @ v.T) * u).sum(0)                         # <W x, u_i v_i x> per factor
    gram = (v @ c @ v.T) * (u.T @ u)                      # <u_i v_i x, u_j v_j x>
    zero = torch.zeros(1, dtype=w.dtype, device=w.device)
    out2 = torch.cat([zero, gram.cumsum(0).cumsum(1).diagonal()])
    diff2 = (ref2 - 2 * torch.cat([zero, dot.cumsum(0)]) + out2).clamp_min(0)
    return (diff2 / ref2).sqrt() if ref2 > 0 else torch.zeros_like(diff2)


def output_error(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None,
                 moment: torch.Tensor) -> dict[str, float]:
    """Expected layer-output error over the calibration inputs (bias excluded), from C alone.

    ||Mx||^2, ||(M-uv)x||^2 and <Mx, uvx> averaged over inputs are traces against C = E[xx^T].
    Only M C costs m n^2; the factored side goes through v C (r n^2), which matters at n = 11008.
    With v None, u is the whole approximation (then u C costs m n^2 too).
    """
    w = weight.detach().double()
    c = moment.double().to(w.device)
    wc = w @ c
    if v is None:
        approx = u.double()
        ac = approx @ c
        out2 = (ac * approx).sum().item()
    else:
        u, v = u.double(), v.double()
        vc = v @ c
        approx, ac = u @ v, u @ vc
        out2 = ((vc @ v.T) * (u.T @ u)).sum().item()    # trace(u (v C v^T) u^T)
    ref2 = (wc * w).sum().item()
    diff2 = max(((wc - ac) * (w - approx)).sum().item(), 0.0)
    dot = (wc * approx).sum().item()
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
