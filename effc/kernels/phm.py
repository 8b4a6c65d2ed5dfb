"""``effc::phm_linear``: a Linear whose weight is a sum of Kronecker products, never built.

A PHM layer (PHNNs) holds W = sum_t a_t kron s_t with a: [T, n, n] and s: [T, p, q]
(out = n p, in = n q): T (n^2 + p q) parameters instead of n^2 p q. Reference
implementations rebuild W at every call, so a trained PHM model runs slower than the dense
one. Here x is viewed as n blocks of q features: the small mixing
xt[m, i, t, :] = sum_j a_t[i, j] x[m, j, :] comes first, then one GEMM of xt ([m n, T q])
against the stacked s ([p, T q], read once) gives every output block row. Measured on CPU
(benchmarks/bench_hypercomplex.py) this order beats the reverse one (s first, then the
mixing), which needs a transposed copy of an n-times-larger intermediate. FLOPs equal
the dense layer's when T = n; weight bytes are 1/n.

The Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) works per output block-row i
the same way per output block-row i: y_i = sum_t (sum_j a_t[i, j] x_j) @ s_t.T, mixing x's
blocks in registers before each tl.dot, so neither W nor xt touches memory and bias and activation are fused into the
store. Its bias, activation and dot options are low_rank's, imported from there.

As low_rank's, the kernel is written once, as the text TEMPLATE with an epilogue slot: this
module fills the slot with the op's epilogue (bias, activation, one store), and the Triton
lowering (effc/compiler/lowering/codegen/phm_template.py) fills it with the fused pointwise
nodes that follow the op in a graph, so a fix to the algorithm reaches both.

Registration follows DESIGN: the torch reference is the CPU implementation and the test
oracle; a fake implementation propagates shapes for Dynamo; on CUDA the op runs the kernel
(`torch.library.triton_op` + `wrap_triton`, so inductor sees it). Without Triton the op is
still registered, with the reference only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton  # bare name: triton_op's source scan looks for it

from effc.kernels.low_rank import (ACTIVATIONS, OP_EPILOGUE, compile_kernel_text, dot_constexprs,
                                   output_buffer)

try:
    import triton
    import triton.language as tl

    from effc.kernels.low_rank import _apply_activation
except ImportError:  # the op still works through the reference
    triton = None
    tl = None


def check_phm_args(x: Tensor, a: Tensor, s: Tensor, bias: Optional[Tensor]) -> tuple[int, int]:
    """Validate the operands once for every implementation; returns (N, K)."""
    if a.dim() != 3 or s.dim() != 3 or a.shape[1] != a.shape[2] or a.shape[0] != s.shape[0]:
        raise ValueError(f"phm_linear expects a: [T, n, n] and s: [T, p, q]; got a "
                         f"{tuple(a.shape)}, s {tuple(s.shape)}")
    _, n, _ = a.shape
    _, p, q = s.shape
    if x.dim() < 1 or x.shape[-1] != n * q:
        raise ValueError(f"phm_linear: x must be [..., n*q] = [..., {n * q}] for a "
                         f"{tuple(a.shape)}, s {tuple(s.shape)}; got x {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n * p,):
        raise ValueError(f"phm_linear: bias must be ({n * p},); got {tuple(bias.shape)}")
    operands = [x, a, s] + ([bias] if bias is not None else [])
    if len({t.dtype for t in operands}) != 1 or len({t.device for t in operands}) != 1:
        raise ValueError("phm_linear: x, a, s and bias must share dtype and device; got "
                         f"{[(t.dtype, str(t.device)) for t in operands]}")
    return n * p, n * q


def phm_linear_reference(x: Tensor, a: Tensor, s: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Plain torch, W never built: the CPU implementation and the oracle."""
    n_out, k = check_phm_args(x, a, s, bias)
    terms, n, _ = a.shape
    _, p, q = s.shape
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    # mix x's n input blocks first: xt[m, (i, t), :] = sum_j a_t[i, j] x[m, j, :] (small),
    mix = a.permute(1, 0, 2).reshape(n * terms, n)
    xt = torch.matmul(mix, x.reshape(m, n, q))                       # [m, (i, t), q]
    # then one GEMM over (t, q) against the stacked s: rows (m, i), columns a of block row i
    # (a free view when s is stored [p, T, q]-contiguous, as the hypercomplex pass stores it)
    stacked = s.transpose(0, 1).reshape(p, terms * q)                # [p, (t, b)]
    y = torch.matmul(xt.reshape(m * n, terms * q), stacked.T).view(lead + (n_out,))
    return y + bias if bias is not None else y


def kron_weight(a: Tensor, s: Tensor) -> Tensor:
    """W = sum_t a_t kron s_t ([n p, n q, *k] for s: [T, p, q, *k]): tests and measurement."""
    terms, n, _ = a.shape
    p, q, *k = s.shape[1:]
    w = torch.einsum("tij,tab...->iajb...", a, s)
    return w.reshape(n * p, n * q, *k)


# The kernel's one source. One program: rows offs_m x the columns i * P + offs_p of output
# block-row i. For each term t and K chunk it mixes x's n blocks with a_t[i, :] (fp32, in
# registers) into xt and adds xt @ s_t[offs_p, chunk].T. Masked lanes read zeros, so ragged M,
# p and q add nothing. Slots: {operand_params} (pointers after x, a, s), {scalar_params}
# (after s's strides), {round_xt} (the fp32 mix xt rounded to the input dtype) and {epilogue}
# (run once on the fp32 output tile `acc`; offs_m/offs_n, mask_m/mask_n, `mask` and N = n p are
# in scope). Fill it with kernel_source(); this module fills it with the op's epilogue, the
# Triton lowering (effc/compiler/lowering/codegen/phm_template.py) with the fused pointwise
# nodes that follow the op in a graph.
TEMPLATE = '''
@triton.jit
def {name}(
    x_ptr, a_ptr, s_ptr, {operand_params}
    M, NB, P, Q, T,
    stride_xm, stride_xk, stride_at, stride_ai, stride_aj, stride_st, stride_sp, stride_sq,
    {scalar_params}
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    p_blocks = tl.cdiv(P, BLOCK_P)
    i = tl.program_id(1) // p_blocks
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_p = (tl.program_id(1) % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_m = offs_m < M
    mask_p = offs_p < P
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for t in range(T):
        for k0 in range(0, Q, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < Q
            mask_x = mask_m[:, None] & mask_k[None, :]
            xt = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for j in range(NB):
                a_tij = tl.load(a_ptr + t * stride_at + i * stride_ai + j * stride_aj).to(tl.float32)
                x_blk = tl.load(x_ptr + offs_m[:, None] * stride_xm + (j * Q + offs_k)[None, :] * stride_xk,
                                mask=mask_x, other=0.0)
                xt += a_tij * x_blk.to(tl.float32)
            s_t_blk = tl.load(s_ptr + t * stride_st + offs_k[:, None] * stride_sq + offs_p[None, :] * stride_sp,
                              mask=mask_k[:, None] & mask_p[None, :], other=0.0)
            # rounded to the input dtype so half types take the tensor-core dot; UPCAST_DOT as in
            # low_rank (the interpreter's dot mishandles bf16 tiles)
            xt_in = {round_xt}
            if UPCAST_DOT:
                xt_in = xt_in.to(tl.float32)
                s_t_blk = s_t_blk.to(tl.float32)
            acc = tl.dot(xt_in, s_t_blk, acc, input_precision=INPUT_PRECISION)
    # ---- epilogue: output columns i * P + offs_p of the [M, N] output ----
    N = NB * P
    offs_n = i * P + offs_p
    mask_n = mask_p
    mask = mask_m[:, None] & mask_n[None, :]
{epilogue}'''


def kernel_source(name: str, operand_params: Sequence[str], scalar_params: Sequence[str],
                  round_xt: str, epilogue: Sequence[str]) -> str:
    """TEMPLATE filled in; `epilogue` lines are indented to the kernel's body here."""
    return TEMPLATE.format(name=name, operand_params="".join(p + ", " for p in operand_params),
                           scalar_params="".join(p + ", " for p in scalar_params),
                           round_xt=round_xt, epilogue="".join(f"    {line}\n" for line in epilogue))


def _make_kernel():
    """The op's kernel: TEMPLATE with low_rank's op epilogue (bias, activation, one store
    through strides), xt rounded by a cast to x's dtype. Compiled under a linecache pseudo file,
    as low_rank's `_op_kernel` does: `@triton.jit` and the interpreter read the source through
    `inspect`."""
    name = "_phm_linear_kernel"
    text = kernel_source(name, ["bias_ptr", "out_ptr"],
                         ["stride_b", "stride_om", "stride_on", "HAS_BIAS: tl.constexpr",
                          "ACTIVATION: tl.constexpr"],
                         "xt.to(x_ptr.dtype.element_ty)", OP_EPILOGUE)
    return compile_kernel_text(__name__, name, text, {"_apply_activation": _apply_activation})


if triton is not None:
    _phm_linear_kernel = _make_kernel()


def _pow2_block(size: int, cap: int) -> int:
    """The smallest power of two >= size, clamped to [16 (tl.dot's minimum), cap]."""
    return min(cap, max(16, 1 << (max(size, 1) - 1).bit_length()))


def phm_linear_triton(x: Tensor, a: Tensor, s: Tensor, bias: Optional[Tensor] = None,
                      activation: str = "none", *, out: Optional[Tensor] = None,
                      block_m: Optional[int] = None, block_p: Optional[int] = None,
                      block_k: Optional[int] = None) -> Tensor:
    """Triton PHM linear, `act(x @ W.T + bias)`; runs on CUDA, or on CPU under TRITON_INTERPRET=1.

    Grid: (cdiv(M, block_m), n * cdiv(p, block_p)). ``out`` (``x.shape[:-1] + (n p,)``, x's
    dtype, any strides) is written in full and returned. Blocks are powers of two >= 16;
    the defaults are untuned (small tiles for few rows, fp32 K chunks halved).
    """
    n_out, k = check_phm_args(x, a, s, bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; expected one of {ACTIVATIONS}")
    if triton is None:
        raise RuntimeError("phm_linear_triton needs the `triton` package, which is not importable")
    terms, n, _ = a.shape
    _, p, q = s.shape
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    out = output_buffer(out, lead + (n_out,), x)
    if m == 0 or n_out == 0:
        return out
    block_m = block_m or (16 if m <= 16 else 64)
    block_p = block_p or _pow2_block(p, 64)
    block_k = block_k or _pow2_block(q, 32 if x.dtype == torch.float32 else 64)
    if any(b < 16 or b & (b - 1) for b in (block_m, block_p, block_k)):
        raise ValueError(f"phm_linear_triton: blocks must be powers of two >= 16; got "
                         f"{(block_m, block_p, block_k)}")
    x2 = x.reshape(m, k)
    out2 = out.view(m, n_out)
    grid = (-(-m // block_m), n * -(-p // block_p))  # ceil divisions: triton.cdiv is a jit function
    wrap_triton(_phm_linear_kernel)[grid](
        x_ptr=x2, a_ptr=a, s_ptr=s, bias_ptr=bias, out_ptr=out2,
        M=m, NB=n, P=p, Q=q, T=terms,
        stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        stride_at=a.stride(0), stride_ai=a.stride(1), stride_aj=a.stride(2),
        stride_st=s.stride(0), stride_sp=s.stride(1), stride_sq=s.stride(2),
        stride_b=bias.stride(0) if bias is not None else 0,
        stride_om=out2.stride(0), stride_on=out2.stride(1),
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation),
        **dot_constexprs(x),
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_K=block_k,
        num_warps=4, num_stages=2 if x.dtype == torch.float32 else 3,
    )
    return out


def _phm_linear_default(x: Tensor, a: Tensor, s: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ (sum_t a_t kron s_t).T + bias without building the weight: the Triton kernel on
    CUDA, the reference on other non-CPU devices. Its signature is the op's schema."""
    if x.device.type == "cuda":
        return phm_linear_triton(x, a, s, bias)
    return phm_linear_reference(x, a, s, bias)


if triton is not None:
    phm_linear = torch.library.triton_op("effc::phm_linear", _phm_linear_default, mutates_args=())
else:
    phm_linear = torch.library.custom_op("effc::phm_linear", _phm_linear_default, mutates_args=())

phm_linear.register_kernel("cpu")(phm_linear_reference)


@phm_linear.register_fake
def _phm_linear_fake(x, a, s, bias=None):
    """Shape propagation only; validates so bad calls fail at trace time too."""
    n_out, _ = check_phm_args(x, a, s, bias)
    return x.new_empty(tuple(x.shape[:-1]) + (n_out,))
