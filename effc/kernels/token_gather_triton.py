"""The Triton kernels of ``effc::token_gather`` and ``effc::token_scatter_add`` (see
effc/kernels/token_gather.py): one pass over the selected rows each, where torch needs
separate kernels for the upcast, the weight multiply, the add and the rounding of the scatter.

Both launch one program per (block of selected rows, block of D columns), masked for the
ragged tails of M and D; nothing is launched when there is nothing to move (M == 0 or D == 0).
The scatter copies x to the output with torch (a plain copy) and then writes the selected rows
as x + update * weight, in fp32, rounded once to x's dtype, as the reference. Launched with
enable_fp_fusion=False so a GPU build does not contract the multiply and the add into an FMA
(one rounding instead of two): fp32 results stay bit-exact with the reference, and 16-bit
ones too on a GPU, whose fp32 -> bf16/fp16 cast rounds to nearest even as torch's. The
interpreter (TRITON_INTERPRET=1, CPU tensors) ignores that option and rounds each op anyway,
but truncates fp32 -> bf16: there bf16 results may be one bf16 ulp nearer zero than the reference's.
Indices must lie in [0, N), as token_route's do; the kernels do not check them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from effc.kernels.low_rank import output_buffer
from effc.kernels.token_gather import (_check_index, _check_scatter, token_gather_reference,
                                       token_scatter_add_reference)

try:
    import triton
    import triton.language as tl
except ImportError:  # the ops still work through the reference
    triton = None
    tl = None

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if triton is not None:

    @triton.jit
    def _token_gather_kernel(
        x_ptr, index_ptr, out_ptr, M, D,
        stride_xn, stride_xd, stride_om, stride_od,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask = mask_m[:, None] & (offs_d < D)[None, :]
        rows = tl.load(index_ptr + offs_m, mask=mask_m, other=0)            # int64
        vals = tl.load(x_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                       mask=mask)
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om
                 + offs_d[None, :] * stride_od, vals, mask=mask)

    @triton.jit
    def _token_scatter_add_kernel(
        x_ptr, index_ptr, update_ptr, weight_ptr, out_ptr, M, D,
        stride_xn, stride_xd, stride_um, stride_ud, stride_w, stride_on, stride_od,
        HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask = mask_m[:, None] & (offs_d < D)[None, :]
        rows = tl.load(index_ptr + offs_m, mask=mask_m, other=0)            # int64
        upd = tl.load(update_ptr + offs_m.to(tl.int64)[:, None] * stride_um
                      + offs_d[None, :] * stride_ud, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + offs_m * stride_w, mask=mask_m, other=0.0)
            upd = upd * w.to(tl.float32)[:, None]
        base = tl.load(x_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                       mask=mask, other=0.0).to(tl.float32)
        res = (base + upd).to(out_ptr.dtype.element_ty)  # round to nearest even, as torch
        tl.store(out_ptr + rows[:, None] * stride_on + offs_d[None, :] * stride_od, res,
                 mask=mask)


def _blocks(m: int, d: int, block_m: Optional[int], block_d: Optional[int]) -> tuple:
    block_d = block_d or min(128, max(16, triton.next_power_of_2(d)))
    block_m = block_m or min(32, max(1, triton.next_power_of_2(m)))
    return block_m, block_d, (triton.cdiv(m, block_m), triton.cdiv(d, block_d))


def token_gather_triton(x: Tensor, index: Tensor, *, out: Optional[Tensor] = None,
                        block_m: Optional[int] = None,
                        block_d: Optional[int] = None) -> Tensor:
    """``effc::token_gather`` by the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    ``out`` ([M, D] in x's dtype, any strides) is written in full and returned. Dtypes other
    than fp32/fp16/bf16, or no Triton: the reference (copied into ``out`` when given)."""
    _check_index("token_gather", x, index)
    m, d = index.shape[0], x.shape[1]
    out = output_buffer(out, (m, d), x)
    if triton is None or x.dtype not in KERNEL_DTYPES:
        return out.copy_(token_gather_reference(x, index))
    if m == 0 or d == 0:
        return out
    index = index.contiguous()
    block_m, block_d, grid = _blocks(m, d, block_m, block_d)
    _token_gather_kernel[grid](
        x, index, out, m, d, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_D=block_d)
    return out


def token_scatter_add_triton(x: Tensor, index: Tensor, update: Tensor,
                             weight: Optional[Tensor] = None, *, out: Optional[Tensor] = None,
                             block_m: Optional[int] = None,
                             block_d: Optional[int] = None) -> Tensor:
    """``effc::token_scatter_add`` by the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    ``out`` ([N, D] in x's dtype, any strides, not overlapping x unless it is x) is written in
    full and returned. x dtypes other than fp32/fp16/bf16, or no Triton: the reference."""
    _check_scatter(x, index, update, weight)
    (n, d), m = x.shape, index.shape[0]
    out = output_buffer(out, (n, d), x)
    if triton is None or x.dtype not in KERNEL_DTYPES:
        return out.copy_(token_scatter_add_reference(x, index, update, weight))
    out.copy_(x)
    if m == 0 or d == 0:
        return out
    index = index.contiguous()
    block_m, block_d, grid = _blocks(m, d, block_m, block_d)
    w = weight if weight is not None else update  # a placeholder pointer, never read
    _token_scatter_add_kernel[grid](
        x, index, update, w, out, m, d,
        x.stride(0), x.stride(1), update.stride(0), update.stride(1),
        weight.stride(0) if weight is not None else 0, out.stride(0), out.stride(1),
        HAS_WEIGHT=weight is not None, BLOCK_M=block_m, BLOCK_D=block_d,
        enable_fp_fusion=False)
    return out
