"""Approximation-error measures shared by passes, verify and tests.

All are computed in float64 so a measurement never adds error of its own. SQNR follows
torchao's tests: 20 log10(||ref|| / ||ref - out||), in dB, infinite for an exact match.
"""

from __future__ import annotations

import math

import torch


def error_stats(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """max_abs, rel_fro (||ref-out|| / ||ref||), cosine and sqnr_db of `out` against `ref`."""
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: reference {tuple(ref.shape)} vs output {tuple(out.shape)}")
    r = ref.detach().to(torch.float64).flatten()
    o = out.detach().to(torch.float64).flatten()
    if r.numel() == 0:
        return {"max_abs": 0.0, "rel_fro": 0.0, "cosine": 1.0, "sqnr_db": math.inf}
    diff = r - o
    ref_norm, diff_norm = r.norm().item(), diff.norm().item()
    out_norm = o.norm().item()
    if ref_norm == 0.0 and out_norm == 0.0:
        cosine = 1.0
    elif ref_norm == 0.0 or out_norm == 0.0:
        cosine = 0.0
    else:
        cosine = float(torch.dot(r, o).item() / (ref_norm * out_norm))
    return {
        "max_abs": diff.abs().max().item(),
        "rel_fro": diff_norm / ref_norm if ref_norm else (0.0 if diff_norm == 0 else math.inf),
        "cosine": cosine,
        "sqnr_db": sqnr_db(ref_norm, diff_norm),
    }


def sqnr_db(signal_norm: float, noise_norm: float) -> float:
    """20 log10(signal / noise); +inf when there is no noise."""
    if noise_norm == 0.0:
        return math.inf
    if signal_norm == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal_norm / noise_norm)


def matrix_rel_error(matrix: torch.Tensor, approx: torch.Tensor,
                     moment: torch.Tensor | None = None) -> float:
    """||(M - M^) L|| / ||M L|| for an input second moment C = L L^T (the layer's relative
    output error over those inputs), or the weight's relative error ||M - M^|| / ||M||."""
    mat = matrix.double()
    diff = mat - approx.double().to(mat.device)
    if moment is None:
        return (diff.norm() / mat.norm().clamp_min(1e-300)).item()
    c = moment.double().to(mat.device)
    num = torch.einsum("ij,jk,ik->", diff, c, diff).clamp_min(0)
    den = torch.einsum("ij,jk,ik->", mat, c, mat).clamp_min(1e-300)
    return (num / den).sqrt().item()
