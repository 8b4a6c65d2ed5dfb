"""The Triton kernel of ``effc::binary_attention`` (see effc/kernels/binary_attention.py).

The codes phi(x) = sign(x P) are computed in torch (one GEMM per operand, as the reference
does, in fp32) and packed into int32 words, b / 32 per row, bit i of word w = code bit
32 w + i (1 for x P >= 0). The kernel works per (batch * head, block of queries): it loops
over key blocks, takes the Hamming distance of every query/key pair by XOR + popcount of the
packed words, sim = b - Hamming (0 where a key is masked: past the keys, or j > i when causal,
top-left aligned), and accumulates sim @ v (tl.dot, fp32, IEEE precision) and the row sums
in fp32; the output is their quotient (denominator clamped to 1e-6, as the reference's),
stored in v's dtype. Causal programs stop at the last key block their queries can see.
Grouped-query attention reads kv head h // (H / H_kv), nothing is repeated in memory.

popcount is written with bit tricks on uint32 (SWAR), so it runs under TRITON_INTERPRET=1
as well as compiled. Code widths b that are not multiples of 32 (or 0) go to the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from effc.kernels.binary_attention import _check, binary_attention_reference
from effc.kernels.low_rank import output_buffer

try:
    import triton
    import triton.language as tl
except ImportError:  # the op still works through the reference
    triton = None
    tl = None


def pack_codes(x: Tensor, proj: Tensor) -> Tensor:
    """The b-bit codes of x ([..., D]) packed as int32 words [..., b // 32]; b % 32 == 0.

    Bit i of word w is 1 where (x P)[32 w + i] >= 0 (the reference's +1), computed in fp32."""
    bits = proj.shape[1]
    if bits % 32:
        raise ValueError(f"pack_codes: b must be a multiple of 32; got {bits}")
    on = (x.float() @ proj.float()) >= 0                                  # [..., b]
    words = on.reshape(on.shape[:-1] + (bits // 32, 32)).to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=x.device) << torch.arange(
        32, device=x.device)
    packed = (words * weights).sum(-1)                                    # [0, 2^32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)         # int32 wrap
    return packed.to(torch.int32).contiguous()


if triton is not None:

    @triton.jit
    def _popcount32(x):
        """Set bits of each int32 (or uint32) lane, as int32: SWAR on the uint32 bit pattern."""
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        u = u + (u >> 8)
        u = u + (u >> 16)
        return (u & 0x3F).to(tl.int32, bitcast=True)

    @triton.jit
    def _popcount_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0)
        tl.store(out_ptr + offs, _popcount32(x), mask=mask)

    @triton.jit
    def _binary_attention_kernel(
        qc_ptr, kc_ptr, v_ptr, out_ptr,
        H, GROUPS, L, S, DV,
        stride_qb, stride_qh, stride_ql,        # packed codes: last dim contiguous
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_ol, stride_od,
        BITS: tl.constexpr, WORDS: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUPS
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < L
        mask_d = offs_d < DV
        qc_base = qc_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        kc_base = kc_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        den = tl.zeros((BLOCK_M,), dtype=tl.float32)
        s_end = S
        if CAUSAL:  # keys past this block's last query are masked for every row
            s_end = tl.minimum(S, (pid_m + 1) * BLOCK_M)
        for n0 in range(0, s_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < S
            ham = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for w in tl.static_range(WORDS):
                qw = tl.load(qc_base + offs_m * stride_ql + w, mask=mask_m, other=0)
                kw = tl.load(kc_base + offs_n * stride_ks + w, mask=mask_n, other=0)
                ham += _popcount32(qw[:, None] ^ kw[None, :])
            sim = (BITS - ham).to(tl.float32)
            keep = mask_m[:, None] & mask_n[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            sim = tl.where(keep, sim, 0.0)
            vb = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                         mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(sim, vb, acc, input_precision="ieee")
            den += tl.sum(sim, axis=1)
        res = acc / tl.maximum(den, 1e-6)[:, None]
        o_ptrs = (out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                  + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])


def popcount_int32(x: Tensor) -> Tensor:
    """The kernel's popcount on an int32 tensor (tests): set bits per element, int32."""
    if triton is None:
        raise RuntimeError("popcount_int32 needs the `triton` package")
    if x.dtype != torch.int32:
        raise ValueError(f"popcount_int32 expects int32; got {x.dtype}")
    flat = x.contiguous().view(-1)
    out = torch.empty_like(flat)
    if flat.numel():
        block = 256
        _popcount_kernel[(-(-flat.numel() // block),)](flat, out, flat.numel(), BLOCK=block)
    return out.view(x.shape)


def _pow2(n: int, lo: int = 16, hi: int = 64) -> int:
    return min(hi, max(lo, 1 << (max(n, 1) - 1).bit_length()))


def binary_attention_triton(q: Tensor, k: Tensor, v: Tensor, proj: Tensor, causal: bool, *,
                            out: Optional[Tensor] = None, block_m: Optional[int] = None,
                            block_n: Optional[int] = None) -> Tensor:
    """``effc::binary_attention`` by the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    ``out`` ([B, H, L, Dv] in v's dtype, any strides) is written in full and returned. Code
    widths that are not a positive multiple of 32, value widths over 256, or no Triton: the
    reference (copied into ``out`` when given)."""
    _check(q, k, v, proj)
    bsz, heads, lq, _ = q.shape
    kv_heads, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    shape = (bsz, heads, lq, dv)
    out = output_buffer(out, shape, v)
    bits = proj.shape[1]
    if triton is None or bits == 0 or bits % 32 or dv > 256:
        out.copy_(binary_attention_reference(q, k, v, proj, causal))
        return out
    if out.numel() == 0:
        return out
    qc, kc = pack_codes(q, proj), pack_codes(k, proj)                     # [B, H(_kv), *, W]
    block_m = block_m or _pow2(lq)
    block_n = block_n or _pow2(lk)
    block_d = _pow2(dv, 16, 256)
    grid = (bsz * heads, -(-lq // block_m))
    _binary_attention_kernel[grid](
        qc, kc, v, out,
        heads, heads // kv_heads, lq, lk, dv,
        qc.stride(0), qc.stride(1), qc.stride(2),
        kc.stride(0), kc.stride(1), kc.stride(2),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        BITS=bits, WORDS=bits // 32, CAUSAL=bool(causal),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out
