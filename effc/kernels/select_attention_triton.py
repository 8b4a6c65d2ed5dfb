"""The Triton kernels of effc/kernels/select_attention.py (TokenSelect decoding).

Two kernels, both reading the cache where it lies (grouped-query attention: query head h reads
KV head h // (H / G), nothing repeated in memory), both in fp32 whatever the input dtypes:

* ``_score_kernel``, one program per (sequence b, query head h, block of T tokens): the logits
  scale * q[b, h] . k[b, g, t], written as fp32 [B, H, T]. This is the pass that reads all of
  K. The rest of select_tokens stays in torch (select_attention.py's soft_votes and
  select_from_votes): the softmax over T per head, the sum over heads, a stable sort for the
  top-k; they touch B * H * T floats, not the cache, and the sort gives the reference's
  lower-index-first tie order, which torch.topk does not promise.
* ``_gather_attention_kernel``, flash-decoding style, one program per (b, h): a loop over the
  S selected indices in blocks, loading the k and v rows by index, an online softmax in fp32
  (running max and sum, earlier blocks rescaled by exp(m_old - m_new)), the value rows
  accumulated in fp32 and divided by the sum once at the end; the output [B, H, 1, Dv] is
  stored in v's dtype. Masked for the ragged tails of S, D (looped in blocks) and Dv.

The logits sum D products in another order than torch's matmul, and the online softmax
rescales as it goes: fp32 results agree with the references to 1e-5 (of max|v|), not bit
for bit.
So select_tokens here can pick another token than the reference where two soft votes tie to
within that rounding. Indices must lie in [0, T); the kernel does not check them.
Dtypes other than fp32/fp16/bf16, Dv over MAX_DV, or no Triton: the references.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from effc.kernels.low_rank import output_buffer
from effc.kernels.select_attention import (_check_budget, _check_gather, _check_qk,
                                           gather_attention_reference, score_logits_reference,
                                           select_from_votes, soft_votes)

try:
    import triton
    import triton.language as tl
except ImportError:  # the ops still work through the references
    triton = None
    tl = None

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DV = 512   # the [BLOCK_DV] fp32 accumulator lives in registers

if triton is not None:

    @triton.jit
    def _score_kernel(
        q_ptr, k_ptr, out_ptr, H, GROUPS, T, D, scale,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_ob, stride_oh, stride_ot,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        g = h // GROUPS
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_rows = (k_ptr + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
                  + offs_t.to(tl.int64)[:, None] * stride_kt)
        acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            qv = tl.load(q_base + offs_d * stride_qd, mask=mask_d, other=0.0).to(tl.float32)
            kv = tl.load(k_rows + offs_d[None, :] * stride_kd,
                         mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(kv * qv[None, :], axis=1)
        o_ptrs = (out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                  + offs_t.to(tl.int64) * stride_ot)
        tl.store(o_ptrs, acc * scale, mask=mask_t)

    @triton.jit
    def _gather_attention_kernel(
        q_ptr, k_ptr, v_ptr, index_ptr, out_ptr, H, GROUPS, S, D, DV, scale,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_ib, stride_is,
        stride_ob, stride_oh, stride_od,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        g = h // GROUPS
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = k_ptr + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vh
        i_base = index_ptr + b.to(tl.int64) * stride_ib
        offs_dv = tl.arange(0, BLOCK_DV)
        mask_dv = offs_dv < DV
        m_i = tl.full((), float("-inf"), tl.float32)     # running max of the logits
        l_i = tl.zeros((), dtype=tl.float32)             # running sum of exp(logit - m_i)
        acc = tl.zeros((BLOCK_DV,), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask_s = offs_s < S
            rows = tl.load(i_base + offs_s * stride_is, mask=mask_s, other=0)   # int64
            logits = tl.zeros((BLOCK_S,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                qv = tl.load(q_base + offs_d * stride_qd, mask=mask_d, other=0.0)
                kv = tl.load(k_base + rows[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                             mask=mask_s[:, None] & mask_d[None, :], other=0.0)
                logits += tl.sum(kv.to(tl.float32) * qv.to(tl.float32)[None, :], axis=1)
            logits = tl.where(mask_s, logits * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, axis=0))   # finite: the block has a row
            alpha = tl.exp(m_i - m_new)                       # 0 on the first block
            p = tl.exp(logits - m_new)                        # 0 on masked rows
            l_i = l_i * alpha + tl.sum(p, axis=0)
            vv = tl.load(v_base + rows[:, None] * stride_vt + offs_dv[None, :] * stride_vd,
                         mask=mask_s[:, None] & mask_dv[None, :], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * vv, axis=0)
            m_i = m_new
        res = acc / l_i
        o_ptrs = (out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                  + offs_dv * stride_od)
        tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask_dv)


def _pow2(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, triton.next_power_of_2(max(n, 1))))


def score_logits_triton(q: Tensor, k: Tensor, scale: float, *, out: Optional[Tensor] = None,
                        block_t: Optional[int] = None,
                        block_d: Optional[int] = None) -> Tensor:
    """score_logits_reference by ``_score_kernel`` (CUDA, or CPU under TRITON_INTERPRET=1):
    fp32 [B, H, T]; ``out`` (fp32, any strides) is written in full and returned."""
    _check_qk("select_tokens", q, k)
    (bsz, heads, _, dim), (_, groups, tokens, _) = q.shape, k.shape
    out = output_buffer(out, (bsz, heads, tokens), q.new_empty((), dtype=torch.float32))
    if triton is None or q.dtype not in KERNEL_DTYPES or k.dtype not in KERNEL_DTYPES:
        return out.copy_(score_logits_reference(q, k, scale))
    if out.numel() == 0:
        return out
    block_t = block_t or _pow2(tokens, 16, 64)
    block_d = block_d or _pow2(dim, 16, 128)
    _score_kernel[(bsz * heads, triton.cdiv(tokens, block_t))](
        q, k, out, heads, heads // groups, tokens, dim, float(scale),
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_T=block_t, BLOCK_D=block_d)
    return out


def select_tokens_triton(q: Tensor, k: Tensor, scale: float, top_k: int, initial: int,
                         recent: int) -> Tensor:
    """``effc::select_tokens`` with the logits from ``_score_kernel``, the rest in torch.
    Skips the kernel when the budget keeps every token (the votes are then not needed)."""
    _check_qk("select_tokens", q, k)
    _check_budget(top_k, initial, recent)
    bsz, tokens = q.shape[0], k.shape[2]
    if initial + recent + top_k >= tokens:
        votes = q.new_empty((bsz, tokens), dtype=torch.float32)   # only its shape is read
    else:
        votes = soft_votes(score_logits_triton(q, k, scale))
    return select_from_votes(votes, top_k, initial, recent)


def gather_attention_triton(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float, *,
                            out: Optional[Tensor] = None, block_s: Optional[int] = None,
                            block_d: Optional[int] = None) -> Tensor:
    """``effc::gather_attention`` by ``_gather_attention_kernel`` (CUDA, or CPU under
    TRITON_INTERPRET=1). ``out`` ([B, H, 1, Dv] in v's dtype, any strides) is written in full
    and returned; S = 0 writes zeros, as the reference."""
    _check_gather(q, k, v, index)
    (bsz, heads, _, dim), groups, dv, sel = q.shape, k.shape[1], v.shape[3], index.shape[1]
    out = output_buffer(out, (bsz, heads, 1, dv), v)
    if triton is None or dv > MAX_DV or any(t.dtype not in KERNEL_DTYPES for t in (q, k, v)):
        return out.copy_(gather_attention_reference(q, k, v, index, scale))
    if out.numel() == 0:
        return out
    if sel == 0:
        return out.zero_()
    block_s = block_s or _pow2(sel, 16, 32)
    block_d = block_d or _pow2(dim, 16, 128)
    _gather_attention_kernel[(bsz * heads,)](
        q, k, v, index, out, heads, heads // groups, sel, dim, dv, float(scale),
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        index.stride(0), index.stride(1),
        out.stride(0), out.stride(1), out.stride(3),
        BLOCK_S=block_s, BLOCK_D=block_d, BLOCK_DV=_pow2(dv, 16, MAX_DV))
    return out


def select_attention_triton(q: Tensor, k: Tensor, v: Tensor, scale: float, top_k: int,
                            initial: int, recent: int) -> Tensor:
    """``effc::select_attention``: select_tokens_triton, then gather_attention_triton."""
    index = select_tokens_triton(q, k, scale, top_k, initial, recent)
    return gather_attention_triton(q, k, v, index, scale)
