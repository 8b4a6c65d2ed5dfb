"""``effc::binary_attention``: attention with queries and keys as b-bit binary codes.

The opt-in attention of the shift_add pass (ShiftAddViT, EcoFormer): phi(x) = sign(x P) in
{-1, +1}^b for a projection P [D, b], and the similarity of a query and a key is the number of
bits their codes share, b - Hamming(phi(q), phi(k)) = (phi(q) . phi(k) + b) / 2, which is
non-negative, so it can weight the values directly, without a softmax:
out_i = sum_j sim_ij v_j / sum_j sim_ij over the keys j the query may see (all, or j <= i when
causal, aligned top-left as scaled_dot_product_attention's is_causal). Without a mask this
is linear attention: with s = sum_j v_j and Phi = phi(K)^T V,
out_i = (phi(q_i) Phi + b s) / (phi(q_i) . sum_j phi(k_j) + b L), O(L b D) instead of O(L^2 D);
the causal form is computed quadratically here (the reference). Keys and values with fewer
heads than the queries (grouped-query attention) are shared by consecutive query heads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effc.kernels.low_rank import lazy_triton


def binary_codes(x: Tensor, proj: Tensor) -> Tensor:
    """sign(x P) as +-1 in x's dtype (0 counts as +1)."""
    return torch.where(x @ proj.to(x.dtype) >= 0, 1.0, -1.0).to(x.dtype)


def _check(q: Tensor, k: Tensor, v: Tensor, proj: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or \
            q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1] or proj.dim() != 2 or \
            proj.shape[0] != q.shape[-1]:
        raise ValueError(f"binary_attention expects q [B, H, L, D], k and v [B, H_kv, S, *] "
                         f"with H_kv dividing H, and proj [D, b]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, proj {tuple(proj.shape)}")


def binary_attention_reference(q: Tensor, k: Tensor, v: Tensor, proj: Tensor,
                               causal: bool) -> Tensor:
    """Plain torch: the CPU implementation and the oracle of the Triton kernel."""
    _check(q, k, v, proj)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    bits = proj.shape[1]
    fq, fk = binary_codes(q.float(), proj), binary_codes(k.float(), proj)
    vf = v.float()
    if not causal:
        num = fq @ (fk.transpose(-1, -2) @ vf) + bits * vf.sum(-2, keepdim=True)
        den = fq @ fk.sum(-2).unsqueeze(-1) + bits * k.shape[-2]
    else:
        sim = (fq @ fk.transpose(-1, -2) + bits) / 2
        lq, lk = q.shape[-2], k.shape[-2]   # top-left aligned, as SDPA's is_causal
        sim = sim.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1),
                              0.0)
        num, den = sim @ vf, sim.sum(-1, keepdim=True)
    return (num / den.clamp_min(1e-6)).to(v.dtype)


@torch.library.custom_op("effc::binary_attention", mutates_args=())
def binary_attention(q: Tensor, k: Tensor, v: Tensor, proj: Tensor, causal: bool) -> Tensor:
    """Hamming-similarity attention; see the module docstring."""
    return binary_attention_reference(q, k, v, proj, causal)


binary_attention.register_kernel("cuda")(
    lazy_triton("effc.kernels.binary_attention_triton", "binary_attention_triton",
                binary_attention_reference))


@binary_attention.register_fake
def _(q, k, v, proj, causal):
    _check(q, k, v, proj)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype)
