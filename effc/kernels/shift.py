"""``effc::shift_linear`` / ``effc::shift_conv``: weights as packed sums of signed powers of two.

A weight is stored as T packed 4-bit codes per element (codes: uint8 [T, m, ceil(n / 2)],
the low nibble holding the even column) and scales [m, G] (one per output channel, or per
`group` input columns): w[o, i] = scale[o, i // group] * sum_t q(code_t[o, i]) with
q(sign << 3 | e) = +-2^-e and e = 7 meaning zero. So weight storage is 4 T bits per element
instead of 32: 4x to 8x less for T = 2 or 1.

CPU: the torch reference decodes the codes into the weight at every call (memory really
shrinks; the decode costs a few passes over the weight) and calls the library linear/conv.
The hypercomplex-style alternative, decoding once at compile time, is the shift_add pass's
`cache_decoded` knob (then no op is called at all).

CUDA (or CPU under TRITON_INTERPRET=1): two Triton kernels for shift_linear read the packed
codes directly; no decoded weight exists in memory. Both unpack each tile's nibbles in
registers (byte k // 2, low nibble for even k) and fuse bias and activation into one strided
store (low_rank's epilogue):
- "shift" (decode sizes, M <= SHIFT_MAX_ROWS rows): a GEMV-like kernel with no multiply for
  the weight values. x * q is formed by subtracting e from the exponent field of x's fp32 bits
  and XOR-ing the code's sign into the sign bit; zero, inf/nan, subnormal x and results that
  underflow (exponent <= 0) take an integer right shift of the significand rounded to nearest
  even, so each product is bit for bit what an IEEE multiply by +-2^-e gives. The products are
  summed over t and over K (tl.sum over the K axis of a [BLOCK_M, BLOCK_N, BLOCK_K] tile) in
  fp32, per scale group, and each group's sum is multiplied by its scale once.
- "dot" (M > SHIFT_MAX_ROWS): each [BLOCK_K, BLOCK_N] weight tile is decoded in registers
  (q built from its bits, summed over t, times the scale of each element's group, rounded to
  x's dtype: the reference's weight, element for element) and multiplied with tl.dot (tensor
  cores on GPU), fp32 accumulation.

Registration follows DESIGN: the torch reference is the CPU implementation and the test
oracle; a fake implementation propagates shapes for Dynamo; shift_linear is a `triton_op`
(kernels visible to inductor) whose CUDA implementation runs the kernels. Without Triton the
op is registered with the reference only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import wrap_triton  # bare name: triton_op's source scan looks for it

from effc.kernels.low_rank import (ACTIVATIONS, OP_EPILOGUE, compile_kernel_text, dot_constexprs,
                                   output_buffer)

try:
    import triton
    import triton.language as tl

    from effc.kernels.low_rank import _apply_activation
except ImportError:  # the ops still work through the reference
    triton = None
    tl = None

_CONVS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
SHIFT_MAX_ROWS = 16  # the CUDA op runs the shift kernel up to this many rows, the dot kernel above
VARIANTS = ("shift", "dot")
def code_values(dtype: torch.dtype, device) -> Tensor:
    """The 16 code values: code = sign << 3 | e -> +-2^-e, e = 7 -> 0."""
    idx = torch.arange(16, device=device)
    e = (idx & 7).to(torch.float32)
    sign = 1.0 - 2.0 * (idx >> 3).to(torch.float32)
    return torch.where((idx & 7) == 7, 0.0, sign * torch.exp2(-e)).to(dtype)


def check_shift_args(n: int, codes: Tensor, scale: Tensor, bias: Optional[Tensor], group: int
                     ) -> int:
    """Validate the weight operands for `n` input columns; returns the output features."""
    if codes.dtype != torch.uint8 or codes.dim() != 3 or codes.shape[2] != math.ceil(n / 2):
        raise ValueError(f"shift op: codes must be uint8 [T, m, ceil(n/2)] = [T, m, "
                         f"{math.ceil(n / 2)}] for {n} input columns; got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    m = codes.shape[1]
    groups = math.ceil(n / group) if group > 0 else 1
    if scale.dim() != 2 or tuple(scale.shape) != (m, groups):
        raise ValueError(f"shift op: scale must be [{m}, {groups}] (group={group}); got "
                         f"{tuple(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"shift op: bias must be ({m},); got {tuple(bias.shape)}")
    return m


def decode_weight(codes: Tensor, scale: Tensor, group: int, n: int, dtype: torch.dtype) -> Tensor:
    """The [m, n] weight the codes and scales stand for, in `dtype` (sums in fp32)."""
    # one table lookup per byte gives both of its columns (twice as fast as unpacking the
    # nibbles first, measured at 4096 x 4096 on CPU)
    values = code_values(torch.float32, codes.device)
    byte = torch.arange(256, device=codes.device)
    pairs = torch.stack([values[byte & 15], values[byte >> 4]], -1)      # [256, 2]
    t, m, half = codes.shape
    w = pairs.index_select(0, codes.reshape(-1).int()).view(t, m, 2 * half).sum(0)[:, :n]
    if group > 0:
        w = w * scale.float().repeat_interleave(group, 1)[:, :n]
    else:
        w = w * scale.float()
    return w.to(dtype)


def shift_linear_reference(x: Tensor, codes: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                           group: int = 0) -> Tensor:
    """x @ W.T + bias with W decoded from packed power-of-two codes (group 0: per channel):
    the CPU implementation and the oracle."""
    check_shift_args(x.shape[-1], codes, scale, bias, group)
    return F.linear(x, decode_weight(codes, scale, group, x.shape[-1], x.dtype), bias)


# The kernels' text, one per variant. Slots: {operand_params} (pointers after x, codes, scale),
# {scalar_params} (after the scale's strides) and {epilogue} (run once on the fp32 output tile
# `acc`; offs_m/offs_n, mask_m/mask_n and `mask` are in scope); the dot kernel also has
# {round_w} (the decoded fp32 tile `w` rounded to x's dtype). Fill them with kernel_source().
# Codes are [T, N, ceil(K / 2)] bytes (strides ct, cn, cb), the scale [N, G] (strides sn, sg);
# GROUP is the group size (K for one scale per row). Masked lanes read x = 0 and the zero code.
# One parameter list for both (the shift kernel ignores the dot options, the dot one N_GROUPS).
_HEAD = '''
@triton.jit
def {name}(
    x_ptr, codes_ptr, scale_ptr, {operand_params}
    M, N, K, T, GROUP, N_GROUPS,
    stride_xm, stride_xk, stride_ct, stride_cn, stride_cb, stride_sn, stride_sg, {scalar_params}
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
'''

_SHIFT_BODY = '''    for g in range(N_GROUPS):
        # group g, columns [g GROUP, min((g + 1) GROUP, K)): summed unscaled, then scaled once
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(g * GROUP, (g + 1) * GROUP, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = (offs_k < (g + 1) * GROUP) & (offs_k < K)
            x_blk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            x_bits = x_blk.to(tl.float32).to(tl.int32, bitcast=True)[:, None, :]
            xq = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
            for t in range(T):
                code = _nibbles(codes_ptr + t * stride_ct, offs_n[:, None], offs_k[None, :],
                                mask_n[:, None] & mask_k[None, :], stride_cn, stride_cb)
                xq += _shift_mul(x_bits, code[None, :, :])
            part += tl.sum(xq, axis=2)
        s = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)
        acc += part * s.to(tl.float32)[None, :]
'''

_DOT_BODY = '''    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask_w = mask_k[:, None] & mask_n[None, :]
        x_blk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # the [BLOCK_K, BLOCK_N] tile of W.T: sum_t q in fp32, times each element's group scale
        w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for t in range(T):
            w += _code_value(_nibbles(codes_ptr + t * stride_ct, offs_n[None, :], offs_k[:, None],
                                      mask_w, stride_cn, stride_cb))
        s = tl.load(scale_ptr + offs_n[None, :] * stride_sn + (offs_k // GROUP)[:, None] * stride_sg,
                    mask=mask_w, other=0.0)
        w = w * s.to(tl.float32)
        w_in = {round_w}
        # UPCAST_DOT as in low_rank (the interpreter's dot mishandles bf16 tiles)
        if UPCAST_DOT:
            x_blk = x_blk.to(tl.float32)
            w_in = w_in.to(tl.float32)
        acc = tl.dot(x_blk, w_in, acc, input_precision=INPUT_PRECISION)
'''

_TAIL = '''    mask = mask_m[:, None] & mask_n[None, :]
    # ---- epilogue ----
{epilogue}'''


def kernel_source(variant: str, name: str, operand_params: Sequence[str],
                  scalar_params: Sequence[str], epilogue: Sequence[str],
                  round_w: str = "w.to(x_ptr.dtype.element_ty)") -> str:
    """The `variant` kernel's text filled in; `epilogue` lines are indented to the kernel body."""
    body = _SHIFT_BODY if variant == "shift" else _DOT_BODY.replace("{round_w}", round_w)
    head = _HEAD.format(name=name, operand_params="".join(p + ", " for p in operand_params),
                        scalar_params="".join(p + ", " for p in scalar_params))
    return head + body + _TAIL.format(epilogue="".join(f"    {line}\n" for line in epilogue))


def _make_kernel(variant: str):
    """The op's `variant` kernel with low_rank's op epilogue (bias, activation, one store),
    compiled under a linecache pseudo file as low_rank's `_op_kernel` is."""
    name = f"_shift_linear_{variant}_kernel"
    text = kernel_source(variant, name, ["bias_ptr", "out_ptr"],
                         ["stride_b", "stride_om", "stride_on", "HAS_BIAS: tl.constexpr",
                          "ACTIVATION: tl.constexpr"], OP_EPILOGUE)
    return compile_kernel_text(__name__, name, text, {
        "_nibbles": _nibbles, "_shift_mul": _shift_mul, "_code_value": _code_value,
        "_apply_activation": _apply_activation})


if triton is not None:

    @triton.jit
    def _nibbles(ptr, rows, cols, mask, stride_cn, stride_cb):
        """The 4-bit codes (int32) of weight rows `rows`, columns `cols` (broadcast against each
        other): byte cols // 2, low nibble for even columns. Masked lanes read the zero code."""
        byte = tl.load(ptr + rows * stride_cn + (cols // 2) * stride_cb, mask=mask, other=0x77)
        return (byte.to(tl.int32) >> ((cols % 2) * 4)) & 15

    @triton.jit
    def _code_value(code):
        """q(code) = +-2^-e (0 for e = 7) in fp32, built from its bits."""
        e = code & 7
        bits = ((127 - e) << 23) | ((code & 8) << 28)
        return tl.where(e == 7, 0.0, bits.to(tl.float32, bitcast=True))

    @triton.jit
    def _shift_mul(x_bits, code):
        """x * q(code) as fp32, x given by its int32 bits: no multiply, the result IEEE's.

        A normal result subtracts e from the exponent field. Where that would reach <= 0 (or x
        is subnormal or zero) the result is subnormal: the significand shifted right by
        sh = e + 1 - max(exponent, 1) (<= 6), rounded to nearest even (a carry into the
        exponent field gives the smallest normal, as it should). inf/nan keep their bits; a
        zero code gives a zero (nan for inf/nan x, as inf * 0). The sign is x's XOR the code's
        (whose zero is +0).
        """
        e = code & 7
        mag = x_bits & 0x7FFFFFFF
        ex = mag >> 23
        sig = tl.where(ex > 0, (mag & 0x7FFFFF) | 0x800000, mag)
        sh = tl.minimum(tl.maximum(e + 1 - tl.maximum(ex, 1), 0), 31)
        kept = sig >> sh
        rem = sig - (kept << sh)
        half = (1 << sh) >> 1
        up = (rem > half) | ((rem == half) & (rem > 0) & ((kept & 1) == 1))
        res = tl.where(ex > e, mag - (e << 23), kept + up.to(tl.int32))
        res = tl.where(ex == 255, mag, res)
        res = tl.where(e == 7, tl.where(ex == 255, 0x7FC00000, 0), res)
        sign = (x_bits ^ tl.where(e == 7, 0, code << 28)) & -2147483648
        return (res | sign).to(tl.float32, bitcast=True)

    _shift_linear_shift_kernel = _make_kernel("shift")
    _shift_linear_dot_kernel = _make_kernel("dot")


def _pow2(size: int) -> int:
    return 1 << (max(size, 1) - 1).bit_length()


def shift_linear_triton(x: Tensor, codes: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                        group: int = 0, activation: str = "none", *, variant: str = "shift",
                        out: Optional[Tensor] = None, block_m: Optional[int] = None,
                        block_n: Optional[int] = None, block_k: Optional[int] = None) -> Tensor:
    """Triton `act(x @ W.T + bias)` from the packed codes; CUDA, or CPU under TRITON_INTERPRET=1.

    variant "shift": exponent-add products, GEMV-like (for few rows; blocks powers of two);
    "dot": tiles decoded in registers and tl.dot (blocks powers of two >= 16). Grid
    (cdiv(M, block_m), cdiv(N, block_n)). ``out`` (``x.shape[:-1] + (codes.shape[1],)``, x's
    dtype, any strides) is written in full and returned. Default blocks are untuned. Under the
    interpreter "dot" rounds the bf16 weight tile by truncation (its cast), not to nearest.
    """
    k = x.shape[-1] if x.dim() else -1
    n_out = check_shift_args(k, codes, scale, bias, group)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; expected one of {ACTIVATIONS}")
    if variant not in VARIANTS:
        raise ValueError(f"shift_linear_triton: variant must be one of {VARIANTS}; got {variant!r}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or \
            not scale.dtype.is_floating_point or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"shift op: x must be fp32/fp16/bf16, scale floating, bias x's dtype; got "
                         f"x {x.dtype}, scale {scale.dtype}, bias {getattr(bias, 'dtype', None)}")
    if len({t.device for t in (x, codes, scale, bias) if t is not None}) != 1:
        raise ValueError("shift op: x, codes, scale and bias must share a device")
    if triton is None:
        raise RuntimeError("shift_linear_triton needs the `triton` package, which is not importable")
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    out = output_buffer(out, lead + (n_out,), x)
    if m == 0 or n_out == 0:
        return out
    group_size = group if group > 0 else max(k, 1)
    if variant == "shift":  # the [BLOCK_M, BLOCK_N, BLOCK_K] product tile stays <= 4096 lanes
        block_m = block_m or min(16, _pow2(m))
        block_n = block_n or min(32, _pow2(n_out))
        block_k = block_k or min(max(4096 // (block_m * block_n), 4), 64, _pow2(group_size))
        smallest = 1
    else:
        block_m = block_m or (16 if m <= 16 else 64)
        block_n = block_n or min(64, max(16, _pow2(n_out)))
        block_k = block_k or min(32 if x.dtype == torch.float32 else 64, max(16, _pow2(k)))
        smallest = 16
    if any(b < smallest or b & (b - 1) for b in (block_m, block_n, block_k)):
        raise ValueError(f"shift_linear_triton: {variant} blocks must be powers of two >= "
                         f"{smallest}; got {(block_m, block_n, block_k)}")
    kernel = _shift_linear_shift_kernel if variant == "shift" else _shift_linear_dot_kernel
    x2 = x.reshape(m, k)
    out2 = out.view(m, n_out)
    grid = (-(-m // block_m), -(-n_out // block_n))  # ceil divisions: triton.cdiv is a jit function
    wrap_triton(kernel)[grid](
        x_ptr=x2, codes_ptr=codes, scale_ptr=scale, bias_ptr=bias, out_ptr=out2,
        M=m, N=n_out, K=k, T=codes.shape[0], GROUP=group_size, N_GROUPS=scale.shape[1],
        stride_xm=x2.stride(0), stride_xk=x2.stride(1), stride_ct=codes.stride(0),
        stride_cn=codes.stride(1), stride_cb=codes.stride(2),
        stride_sn=scale.stride(0), stride_sg=scale.stride(1),
        stride_b=bias.stride(0) if bias is not None else 0,
        stride_om=out2.stride(0), stride_on=out2.stride(1),
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation),
        **dot_constexprs(x), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=2 if x.dtype == torch.float32 else 3,
    )
    return out


def _shift_linear_default(x: Tensor, codes: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                          group: int = 0) -> Tensor:
    """x @ W.T + bias from the packed codes: on CUDA the shift kernel up to SHIFT_MAX_ROWS rows
    and the dot kernel above, the reference on other non-CPU devices. Its signature is the
    op's schema."""
    if x.device.type == "cuda":
        rows = math.prod(x.shape[:-1])
        return shift_linear_triton(x, codes, scale, bias, group,
                                   variant="shift" if rows <= SHIFT_MAX_ROWS else "dot")
    return shift_linear_reference(x, codes, scale, bias, group)


if triton is not None:
    shift_linear = torch.library.triton_op("effc::shift_linear", _shift_linear_default,
                                           mutates_args=())
else:
    shift_linear = torch.library.custom_op("effc::shift_linear", _shift_linear_default,
                                           mutates_args=())

shift_linear.register_kernel("cpu")(shift_linear_reference)


@shift_linear.register_fake
def _shift_linear_fake(x, codes, scale, bias=None, group=0):
    m = check_shift_args(x.shape[-1], codes, scale, bias, group)
    return x.new_empty(tuple(x.shape[:-1]) + (m,))


@torch.library.custom_op("effc::shift_conv", mutates_args=())
def shift_conv(x: Tensor, codes: Tensor, scale: Tensor, bias: Optional[Tensor], group: int,
               kernel: list[int], stride: list[int], padding: list[int],
               dilation: list[int]) -> Tensor:
    """conv(x, W, bias) with W [m, C_in, *kernel] decoded from the codes (columns C_in * k)."""
    cin = x.shape[-len(kernel) - 1]
    n = cin * math.prod(kernel)
    check_shift_args(n, codes, scale, bias, group)
    w = decode_weight(codes, scale, group, n, x.dtype).reshape(codes.shape[1], cin, *kernel)
    return _CONVS[len(kernel) + 2](x, w, bias, stride, padding, dilation)


@shift_conv.register_fake
def _shift_conv_fake(x, codes, scale, bias, group, kernel, stride, padding, dilation):
    cin = x.shape[-len(kernel) - 1]
    m = check_shift_args(cin * math.prod(kernel), codes, scale, bias, group)
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[-len(kernel):], kernel, stride, padding,
                                           dilation)]
    return x.new_empty((*x.shape[:-len(kernel) - 1], m, *spatial))
