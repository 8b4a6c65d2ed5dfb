"""The math of the shift_add pass, free of FX: weights as scaled sums of signed powers of two.

Each weight w ~ s_g * sum_t q_t with q_t in {0, +-1, +-1/2, ..., +-1/64} and one scale s_g per
output channel (or per group of `group` input columns of it). A term is a 4-bit code: bit 3 the
sign, bits 0-2 the exponent e (q = +-2^-e), e = 7 meaning zero; codes are packed two per byte.
So x * q is a shift of x (an add to its float exponent), and a T-term weight costs 4 T bits.

Fitting, per site:
- greedy residual terms: q_1 = nearest level to w / s, q_2 = nearest level to the rest, ...;
- scales by least squares given the codes, alternating with re-encoding (a few rounds);
- with calibration (input second moment C): output-aware rounding, GPTQ-style: columns are
  rounded in order and each column's rounding error, weighted by the inverse Hessian C^-1, is
  pushed onto the columns not yet rounded, so the layer's output error, not the weight's, is
  what the rounding minimizes; the scales are then refit against C.
Weights that already are scaled sums of at most T powers of two (a DeepShift model) are found
by `exact_codes` and convert without error.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from effc.compiler.metrics import matrix_rel_error
from effc.kernels.shift import code_values

MAX_EXPONENT = 6           # levels 2^0 .. 2^-6; exponent code 7 is zero
ZERO_CODE = 7
ROUNDS = 3                 # scale refits alternating with re-encoding
DAMP = 0.01                # GPTQ damping, relative to the mean diagonal of C
BLOCK = 128                # GPTQ columns per lazy update
EXACT_TOL = 1e-6           # relative residual under which a weight "is" a sum of powers of two
INIT_FRACTIONS = (1.0, 0.75, 0.5, 0.35, 0.25)  # initial scales tried, as fractions of max|w|


def lut(dtype=torch.float64, device=None) -> torch.Tensor:
    """The 16 code values (the op's table): code = sign << 3 | e, value +-2^-e, e = 7 -> 0."""
    return code_values(dtype, device)


def nearest(r: torch.Tensor) -> torch.Tensor:
    """The 4-bit code of the level nearest to each element of r (ties to the larger level)."""
    a = r.abs()
    e_hi = torch.floor(-torch.log2(a)).clamp(0, MAX_EXPONENT)          # 2^-e_hi >= a (a <= 1)
    hi = torch.pow(2.0, -e_hi)
    lo = torch.where(e_hi < MAX_EXPONENT, hi / 2, torch.zeros_like(hi))
    take_hi = (a - lo) >= (hi - a)
    e = torch.where(take_hi, e_hi, torch.where(lo > 0, e_hi + 1, torch.full_like(e_hi, ZERO_CODE)))
    sign = (r < 0) & (e != ZERO_CODE)
    return (sign.to(torch.uint8) << 3) | e.to(torch.uint8)


def encode(x: torch.Tensor, terms: int) -> torch.Tensor:
    """Greedy residual codes [T, *x.shape] of x (already divided by its scale)."""
    table = lut(x.dtype, x.device)
    codes, r = [], x
    for _ in range(terms):
        c = nearest(r)
        codes.append(c)
        r = r - table[c.long()]
    return torch.stack(codes)


def decode(codes: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """sum_t q_t of codes [T, ...]."""
    return lut(dtype, codes.device)[codes.long()].sum(0)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[T, m, n] 4-bit codes -> [T, m, ceil(n / 2)] bytes (low nibble: the even column)."""
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, torch.full_like(codes[..., :1], ZERO_CODE)], -1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack: [T, m, ceil(n / 2)] bytes -> [T, m, n] codes."""
    both = torch.stack([packed & 15, packed >> 4], -1)
    return both.reshape(*packed.shape[:-1], -1)[..., :n]


def group_index(n: int, group: int | None) -> torch.Tensor:
    """The scale column of each of n input columns."""
    return torch.arange(n) // (group or n)


@dataclasses.dataclass
class ShiftFit:
    """Codes [T, m, n] and scales [m, G] of one weight, and what they cost."""

    codes: torch.Tensor
    scale: torch.Tensor
    group: int | None
    exact: bool = False

    @property
    def terms(self) -> int:
        return self.codes.shape[0]

    def matrix(self) -> torch.Tensor:
        cols = group_index(self.codes.shape[-1], self.group).to(self.scale.device)
        return decode(self.codes) * self.scale[:, cols]

    def bytes(self, scale_bytes: int = 4) -> int:
        """Packed codes plus scales."""
        t, m, n = self.codes.shape
        return t * m * math.ceil(n / 2) + self.scale.numel() * scale_bytes


def _expand(scale: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return scale[:, cols]


def _refit_scale(w: torch.Tensor, d: torch.Tensor, cols: torch.Tensor, groups: int,
                 moment: torch.Tensor | None, old: torch.Tensor) -> torch.Tensor:
    """Least-squares scales given decoded codes d: per channel against C when given (the
    output error), else (and per group) against the weight; the old scale where d is zero."""
    if moment is not None and groups == 1:
        dc = d @ moment
        num, den = (w @ moment * d).sum(1, keepdim=True), (dc * d).sum(1, keepdim=True)
    else:
        weight = moment.diagonal()[None, :] if moment is not None else torch.ones_like(w[:1])
        num = torch.zeros(w.shape[0], groups, dtype=w.dtype, device=w.device)
        den = torch.zeros_like(num)
        num.index_add_(1, cols, w * d * weight)
        den.index_add_(1, cols, d * d * weight)
    return torch.where(den > 0, num / den.clamp_min(1e-300), old)


def _gptq(w: torch.Tensor, scale_cols: torch.Tensor, moment: torch.Tensor, terms: int
          ) -> torch.Tensor:
    """Codes of w / scale rounded column by column with the error pushed onto later columns
    through the Cholesky factor of C^-1 (GPTQ), in blocks of BLOCK columns; columns in order
    of decreasing input energy (GPTQ's act-order: the columns that matter most are rounded
    while the most others are left to absorb their error)."""
    order = torch.argsort(moment.diagonal(), descending=True)
    codes = _gptq_ordered(w[:, order], scale_cols[:, order], moment[order][:, order], terms)
    out = torch.empty_like(codes)
    out[:, :, order] = codes
    return out


def _gptq_ordered(w: torch.Tensor, scale_cols: torch.Tensor, moment: torch.Tensor, terms: int
                  ) -> torch.Tensor:
    n = w.shape[1]
    h = moment.clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    h += DAMP * h.diagonal().mean() * torch.eye(n, dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    work = w.clone()
    work[:, dead] = 0
    codes = torch.empty((terms,) + tuple(w.shape), dtype=torch.uint8, device=w.device)
    table = lut(w.dtype, w.device)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        err = torch.zeros(w.shape[0], b1 - b0, dtype=w.dtype, device=w.device)
        for j in range(b0, b1):
            col = work[:, j]
            c = encode(col / scale_cols[:, j], terms)
            codes[:, :, j] = c
            q = table[c.long()].sum(0) * scale_cols[:, j]
            e = (col - q) / u[j, j]
            work[:, j + 1:b1] -= e[:, None] * u[j, j + 1:b1][None, :]
            err[:, j - b0] = e
        work[:, b1:] -= err @ u[b0:b1, b1:]
    return codes


def _initial_scale(w: torch.Tensor, amax: torch.Tensor, cols: torch.Tensor, groups: int,
                   terms: int, moment: torch.Tensor | None) -> torch.Tensor:
    """The best of a few fractions of max|w| (T terms can sum past 1, so a scale below the
    largest weight can fit the many small ones better), by the greedy codes' error weighted
    by the input energies diag(C) (cheap: no GPTQ)."""
    energy = moment.diagonal()[None, :] if moment is not None else torch.ones_like(w[:1])
    best, best_err = amax, None
    for frac in INIT_FRACTIONS:
        scale = amax * frac
        d = decode(encode(w / scale[:, cols], terms))
        scale = _refit_scale(w, d, cols, groups, None, scale)
        err = ((w - decode(encode(w / scale[:, cols], terms)) * scale[:, cols]) ** 2
               * energy).sum(1)
        if best_err is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            rows = better[:, None].expand_as(best)
            best, best_err = torch.where(rows, scale, best), torch.minimum(err, best_err)
    return best


def fit(matrix: torch.Tensor, terms: int, group: int | None = None,
        moment: torch.Tensor | None = None) -> ShiftFit:
    """T-term codes and scales of `matrix` [m, n]: weight-error fit, or output-aware with C."""
    w = matrix.double()
    m, n = w.shape
    cols = group_index(n, group).to(w.device)
    groups = int(cols[-1].item()) + 1
    amax = torch.zeros(m, groups, dtype=w.dtype, device=w.device)
    amax.scatter_reduce_(1, cols.expand(m, n), w.abs(), reduce="amax")
    c = moment.double().to(w.device) if moment is not None else None
    scale = _initial_scale(w, torch.where(amax > 0, amax, torch.ones_like(amax)), cols, groups,
                           terms, c)
    best, best_err = None, math.inf
    for _ in range(ROUNDS):
        codes = _gptq(w, _expand(scale, cols), c, terms) if c is not None else \
            encode(w / _expand(scale, cols), terms)
        d = decode(codes)
        scale = _refit_scale(w, d, cols, groups, c, scale)
        candidate = ShiftFit(codes, scale.clone(), group)
        err = matrix_rel_error(w, candidate.matrix(), c)
        if err < best_err:
            best, best_err = candidate, err
    return best


def _magnitudes(terms: int) -> torch.Tensor:
    """Every positive value a sum of `terms` levels takes (float64, ascending)."""
    values = lut().unique()
    total = values
    for _ in range(terms - 1):
        total = (total[:, None] + values[None, :]).flatten().unique()
    return total[total > 0]


def _row_exact(row: torch.Tensor, terms: int) -> bool:
    """Whether one row is max|row| / v times a T-term sum for some v, all v in one batch."""
    x = row[None, :] / row.abs().max() * _magnitudes(terms)[:, None].to(row.device)
    residual = (x - decode(encode(x, terms))).norm(dim=1) / x.norm(dim=1)
    return bool((residual <= EXACT_TOL).any())


def exact_codes(matrix: torch.Tensor, max_terms: int = 3) -> ShiftFit | None:
    """Per-channel codes and scales that reproduce `matrix` (to float rounding) with the
    fewest terms <= max_terms; None if there are none (greedy codes, so a representable row
    the greedy walk does not decompose is missed).

    A row's scale is max|w| / v for v one of the values T terms can take (the largest
    element's); rows are tried against every v. Dense rows are ruled out first by their
    number of distinct magnitudes, which a T-term row cannot exceed.
    """
    w = matrix.double()
    m, n = w.shape
    amax = w.abs().amax(1, keepdim=True)
    for rows in (w[:8], w):  # a few rows rule out most dense weights cheaply
        sorted_abs = rows.abs().sort(1).values
        distinct = int(((sorted_abs[:, 1:] != sorted_abs[:, :-1]).sum(1) + 1).max().item())
        if distinct > len(_magnitudes(max_terms)) + 1:
            return None
    first = int(amax[:, 0].argmax().item())  # then one row against every scale at once
    if not any(_row_exact(w[first], t) for t in range(1, max_terms + 1)):
        return None
    rownorm = w.norm(dim=1).clamp_min(1e-300)
    for terms in range(1, max_terms + 1):
        codes = torch.full((terms, m, n), ZERO_CODE, dtype=torch.uint8, device=w.device)
        scale = torch.ones(m, 1, dtype=w.dtype, device=w.device)
        done = amax[:, 0] == 0
        for v in _magnitudes(terms).flip(0).tolist():
            if bool(done.all()):
                break
            s = torch.where(amax > 0, amax / v, torch.ones_like(amax))
            c = encode(w / s, terms)
            exact = ((w - decode(c) * s).norm(dim=1) / rownorm <= EXACT_TOL) & ~done
            codes[:, exact], scale[exact] = c[:, exact], s[exact]
            done |= exact
        if bool(done.all()):
            return ShiftFit(codes, scale, None, exact=True)
    return None
