"""kv_proj's math: per-head bases for keys and values, RoPE-aware pair selection, ranks.

Values: the cache stores V P (P: the top-r eigenvectors of E[v v^T] per KV head) and attention
reads V P P^T; the error is the energy of the discarded directions. Centered (a mean mu from
calibration): the cache stores (V - mu) P, attention reads (V - mu) P P^T + mu, and P comes from
the covariance E[v v^T] - mu mu^T. At equal rank that never leaves more energy out (Ky Fan: the
covariance's top-r sum is at least the second moment's, minus the rank-one mu mu^T), and the mean
costs nothing per token.
Keys with RoPE: a projection does not commute with the rotation, but a selection of whole
rotation planes does (RoPE rotates dims i and i + d/2 together, rotate_half's pairing), so the
cache keeps 2s of the d dims and the scores keep the selected planes' terms exactly. Planes are
ranked by their share of the scores: sqrt(E|q_p|^2 E|k_p|^2), an upper bound of a plane's term
by Cauchy-Schwarz; both energies are rotation-invariant, so pre-RoPE moments give them.
Keys without RoPE: a PCA basis, as for values.
"""

from __future__ import annotations

import torch

from effc.passes.budget import Candidate, SiteOptions, allocate


def round_rank(rank: float, dim: int, multiple: int) -> int:
    """`rank` rounded up to a multiple of `multiple`, within [multiple, dim]."""
    m = max(1, multiple)
    r = int(-(-rank // m) * m) if rank > 0 else m
    return max(min(r, dim), min(m, dim))


def eigen(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending [H, d], eigenvectors as columns [H, d, d]) of per-head E[x x^T]."""
    vals, vecs = torch.linalg.eigh(moment.double())
    return vals.flip(-1).clamp_min(0.0), vecs.flip(-1)


def centered(moment: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """Per head E[x x^T] - mu mu^T (the covariance), or the moment itself without a mean."""
    if mean is None:
        return moment.double()
    mu = mean.double().reshape(moment.shape[:-1])
    return moment.double() - mu[..., :, None] * mu[..., None, :]


def pca_basis(moment: torch.Tensor, rank: int, mean: torch.Tensor | None = None
              ) -> torch.Tensor:
    """[H, d, r]: per head, the top-`rank` eigenvectors of E[x x^T], or of the covariance
    when the mean is subtracted first (orthonormal columns)."""
    return eigen(centered(moment, mean))[1][..., :rank].float()


def pca_errors(moment: torch.Tensor, mean: torch.Tensor | None = None) -> list[float]:
    """Relative error sqrt(discarded energy / total energy E|x|^2) over all heads at every
    rank 0..d (one eigendecomposition for all of them); centered when `mean` is given (the
    mean is restored exactly, so only the covariance's tail is lost)."""
    total = float(moment.double().diagonal(dim1=-2, dim2=-1).sum())
    return _tail_errors(eigen(centered(moment, mean))[0], total)


def pca_error(moment: torch.Tensor, rank: int, mean: torch.Tensor | None = None) -> float:
    """pca_errors(moment, mean)[rank]."""
    return pca_errors(moment, mean)[rank]


def _tail_errors(values: torch.Tensor, total: float | None = None) -> list[float]:
    """[H, n] non-negative values sorted descending per row -> sqrt(share of `total` (default:
    all the values) left out when keeping the first r of each row), for r = 0..n."""
    tails = torch.cat([values.sum(0).flip(0).cumsum(0).flip(0), values.new_zeros(1)])
    total = float(tails[0]) if total is None else total
    return [min(float(t) / total, 1.0) ** 0.5 if total > 0 else 0.0 for t in tails]


def plane_scores(key_moment: torch.Tensor, query_energy: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """[G, d/2]: each KV head's rotation planes (dims i, i + d/2) scored by their share of the
    attention scores: sqrt(E|q_i|^2 E|k_i|^2) (keys only, E|k_i|^2, without query energies)."""
    diag = key_moment.double().diagonal(dim1=-2, dim2=-1)  # [G, d]
    half = diag.shape[-1] // 2
    keys = diag[:, :half] + diag[:, half:]
    if query_energy is None:
        return keys
    return (keys * query_energy.double()).clamp_min(0.0).sqrt()


def plane_selection(scores: torch.Tensor, planes: int) -> torch.Tensor:
    """[G, d, 2 * planes] 0/1 matrices selecting each head's best `planes` planes, ordered as
    [first halves, second halves] (so rotate_half still pairs column j with j + planes)."""
    g, half = scores.shape
    top = scores.topk(planes, dim=-1).indices.sort(dim=-1).values   # [G, planes]
    cols = torch.cat([top, top + half], dim=-1)                      # [G, 2 planes]
    sel = torch.zeros(g, 2 * half, 2 * planes)
    sel.scatter_(1, cols.unsqueeze(1), 1.0)
    return sel


def plane_errors(scores: torch.Tensor) -> list[float]:
    """Relative error proxy of keeping 0..d/2 planes per head: sqrt(dropped score share)."""
    return _tail_errors(scores.sort(dim=-1, descending=True).values)


def plane_error(scores: torch.Tensor, planes: int) -> float:
    """plane_errors(scores)[planes]."""
    return plane_errors(scores)[planes]


def query_plane_energy(w_q: torch.Tensor, moment: torch.Tensor | None, heads: int,
                       kv_heads: int) -> torch.Tensor:
    """[G, d/2]: E|q_p|^2 of each rotation plane, summed over the query heads that share a
    KV head (from W_q [H d, in] and the input's E[x x^T]; identity without calibration)."""
    w = w_q.double()
    per_row = (w @ moment.double() * w).sum(-1) if moment is not None else w.square().sum(-1)
    d = w.shape[0] // heads
    e = per_row.reshape(heads, d)
    e = e[:, : d // 2] + e[:, d // 2:]
    return e.reshape(kv_heads, heads // kv_heads, d // 2).sum(1)


def rank_options(name: str, errors: list[float], dim: int, g: int, multiple: int, size: int,
                 per: int = 1, extra: int = 0) -> SiteOptions:
    """One layer's keys or values: a candidate per rank (a multiple of `multiple`, up to
    `dim`), with its error `errors[rank // per]` and its bytes per token (`extra` more when
    projected: latent keys' position id)."""
    ranks = sorted({round_rank(r, dim, multiple) for r in range(1, dim + 1)})
    cost = lambda r: g * r * size + (extra if r < dim else 0)  # noqa: E731
    return SiteOptions(name, [Candidate(r, cost(r), errors[r // per], bytes=cost(r))
                              for r in ranks])


def choose_ranks(options: list[SiteOptions], config) -> dict[str, Candidate]:
    """One rank per layer and K/V: `ratio` uniformly, a bytes `budget` through the shared
    allocator, or the least rank keeping `min_energy` of the energy (error^2 <= 1 - it)."""
    if config.ratio is not None:
        out = {}
        for s in options:
            d = max(c.choice for c in s.candidates)
            want = config.ratio * d
            out[s.key] = min((c for c in s.candidates if c.choice >= want - 1e-9),
                             key=lambda c: c.choice)
        return out
    if config.budget is not None:
        total = sum(max(c.bytes for c in s.candidates) for s in options)
        return allocate(options, max_params=config.budget * total, cost="bytes")
    bound = 1.0 - config.min_energy
    return {s.key: min((c for c in s.candidates if c.error ** 2 <= bound + 1e-12),
                       key=lambda c: c.bytes) for s in options}
