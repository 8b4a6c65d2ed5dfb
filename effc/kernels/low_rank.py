"""``effc::low_rank_linear``: a factorized Linear ``act((x @ v.T) @ u.T + bias)``.

A Linear whose weight was replaced by ``W ~= u @ v`` (``u: [N, r]``, ``v: [r, K]``)
costs ``r * (K + N)`` multiply-adds per row instead of ``N * K``. Done as two plain
matmuls it also writes and re-reads the ``[M, r]`` intermediate and runs the bias and
activation as extra elementwise passes. The Triton kernel here keeps the intermediate
in registers and fuses bias and activation into the store.

The kernel is written once, as the text TEMPLATE with an epilogue slot: this module fills the
slot with the op's epilogue (bias, activation, one store), and the Triton lowering
(effc/compiler/lowering/codegen/templates.py) fills it with the fused pointwise nodes that follow the op
in a graph. So a fix to the algorithm reaches both; the launch rules (rank padding, column
splits, dot options) are shared the same way.

Registration (see DESIGN): a torch reference (CPU implementation and test oracle), a
fake implementation for Dynamo/FakeTensor shape propagation, and a Triton path used for
CUDA tensors via ``torch.library.triton_op`` + ``wrap_triton`` so inductor can see the
kernel. Without Triton the op is still registered, with the reference only.
"""

import hashlib
import importlib
import linecache
import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import wrap_triton  # bare name: triton_op's source scan looks for it

try:
    import triton
    import triton.language as tl
except ImportError:  # the op still works on CPU through the reference
    triton = None
    tl = None

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")

# Above this rank the [BLOCK_M, r] fp32 intermediate no longer fits comfortably in
# registers, so the CUDA path uses two library matmuls instead of the fused kernel.
MAX_FUSED_RANK = 128

_TORCH_ACTIVATIONS = {
    "none": lambda y: y,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}


def _check_args(x, v, u, bias, activation) -> int:
    """Validate the operands once for every implementation; returns N."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; expected one of {ACTIVATIONS}")
    if x.dim() < 1 or v.dim() != 2 or u.dim() != 2:
        raise ValueError(
            "low_rank_linear expects x: [..., K], v: [r, K], u: [N, r]; got "
            f"x {tuple(x.shape)}, v {tuple(v.shape)}, u {tuple(u.shape)}"
        )
    rank, k = v.shape
    if x.shape[-1] != k or u.shape[1] != rank:
        raise ValueError(
            "low_rank_linear shape mismatch: need x[..., K], v[r, K], u[N, r]; got "
            f"x {tuple(x.shape)}, v {tuple(v.shape)}, u {tuple(u.shape)}"
        )
    n = u.shape[0]
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"low_rank_linear: bias must have shape ({n},) to match u {tuple(u.shape)}; got {tuple(bias.shape)}")
    operands = [x, v, u] + ([bias] if bias is not None else [])
    if len({t.dtype for t in operands}) != 1 or len({t.device for t in operands}) != 1:
        raise ValueError(
            "low_rank_linear: x, v, u and bias must share dtype and device; got "
            f"{[(t.dtype, str(t.device)) for t in operands]}"
        )
    return n


def low_rank_linear_reference(x: Tensor, v: Tensor, u: Tensor, bias: Optional[Tensor] = None,
                              activation: str = "none") -> Tensor:
    """Plain torch: the CPU implementation, the r > MAX_FUSED_RANK CUDA fallback, and the oracle."""
    _check_args(x, v, u, bias, activation)
    return _TORCH_ACTIVATIONS[activation](F.linear(F.linear(x, v), u, bias))


# acc = x @ w.T for this program's rows, over all of K, in fp32 (masked lanes read zeros): the
# first product of TEMPLATE, and the whole product of the lowering's dense GEMM template. Fill it
# with x_times_wt().
_X_TIMES_WT = '''    {acc} = tl.zeros((BLOCK_M, {width}), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x_blk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_t_blk = tl.load({w}_ptr + offs_k[:, None] * stride_{w}k + offs_{c}[None, :] * stride_{w}{c},
                          mask=mask_k[:, None] & mask_{c}[None, :], other=0.0)
        # UPCAST_DOT: the interpreter's dot multiplies bf16 tiles as raw uint16, so there
        # (only) tiles are widened first; products of bf16 values are exact in fp32, so this
        # matches a bf16 tensor-core dot with fp32 accumulation
        if UPCAST_DOT:
            x_blk = x_blk.to(tl.float32)
            w_t_blk = w_t_blk.to(tl.float32)
        {acc} = tl.dot(x_blk, w_t_blk, {acc}, input_precision=INPUT_PRECISION)
'''


def x_times_wt(acc: str, w: str, c: str, width: str) -> str:
    """_X_TIMES_WT for weight `w` ([C, K]: `{w}_ptr`, `stride_{w}{c}`, `stride_{w}k`) whose rows
    are indexed by offs_{c}/mask_{c}; `acc` is [BLOCK_M, width]."""
    return _X_TIMES_WT.format(acc=acc, w=w, c=c, width=width).rstrip("\n")


# The kernel's one source. Slots: {operand_params} (pointers after x, v, u), {scalar_params}
# (after u's strides), {round_t} (the fp32 intermediate rounded to the input dtype) and
# {epilogue} (run on every fp32 output tile `acc`; offs_m/offs_n, mask_m/mask_n and `mask`
# are in scope). Fill it with kernel_source().
TEMPLATE = '''
@triton.jit
def {name}(
    x_ptr, v_ptr, u_ptr, {operand_params}
    M, N, K, R,
    stride_xm, stride_xk, stride_vr, stride_vk, stride_un, stride_ur, {scalar_params}
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R

    # t = x @ v.T for this program's rows ([BLOCK_M, R_PAD], fp32), once; it stays in
    # registers for every column block the program owns. Rank padding is masked to zero, so
    # it adds nothing to the second product.
{x_times_vt}
    # eager's first matmul returns t in the input dtype; for half types this also keeps the
    # second product on the tensor-core path
    t_in = {round_t}
    if UPCAST_DOT:
        t_in = t_in.to(tl.float32)

    # this program's column blocks: pid_n, pid_n + n_split, ... (n_split = grid dim 1)
    for n_block in range(tl.program_id(1), tl.cdiv(N, BLOCK_N), tl.num_programs(1)):
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = mask_m[:, None] & mask_n[None, :]
        u_t_blk = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                          mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if UPCAST_DOT:
            u_t_blk = u_t_blk.to(tl.float32)
        acc = tl.dot(t_in, u_t_blk, input_precision=INPUT_PRECISION)
        # ---- epilogue ----
{epilogue}'''

# the bias as every GEMM template adds it: read once per column block, in fp32, before anything else
BIAS_ADD = "acc += tl.load(bias_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]"


def kernel_source(name: str, operand_params: Sequence[str], scalar_params: Sequence[str],
                  round_t: str, epilogue: Sequence[str]) -> str:
    """TEMPLATE filled in; `epilogue` lines are indented to the column loop here."""
    return TEMPLATE.format(name=name, operand_params="".join(p + ", " for p in operand_params),
                           scalar_params="".join(p + ", " for p in scalar_params),
                           x_times_vt=x_times_wt("t", "v", "r", "R_PAD"), round_t=round_t,
                           epilogue="".join(f"        {line}\n" for line in epilogue))


def rank_block(rank: int) -> int:
    """R_PAD: the rank padded to a power of two >= 16 (tl.dot's minimum)."""
    return max(16, 1 << (rank - 1).bit_length())


def column_splits(row_blocks: int, col_blocks: int, device: torch.device) -> int:
    """Grid dim 1, the programs sharing one row block's columns: the fewest that fill a GPU.

    Each split recomputes t, so large-M calls get 1; one under the interpreter (one program
    at a time anyway).
    """
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 1
    return max(1, min(-(-target // max(row_blocks, 1)), col_blocks))  # 0 rows: one program


def fused_fills_gpu(m: int, n: int, device: torch.device) -> bool:
    """Whether the fused kernel's row blocks alone fill the GPU for `m` rows (no column splits).

    With splits, every split recomputes t = x @ v.T and so re-reads all of v: at decode sizes
    (a few rows) that is hundreds of reads of v. Then a library GEMM for t and a second GEMM
    over u read each factor once, at the price of writing and reading t ([m, r], small).
    Always true off CUDA (one program at a time: no splits).
    """
    return column_splits(-(-m // 64), -(-n // 64), device) == 1


def dot_constexprs(x: Tensor) -> dict:
    """INPUT_PRECISION and UPCAST_DOT for the GEMM templates, given their x operand."""
    cuda = x.device.type == "cuda"
    tf32 = x.dtype == torch.float32 and cuda and torch.backends.cuda.matmul.allow_tf32
    return {"INPUT_PRECISION": "tf32" if tf32 else "ieee",
            "UPCAST_DOT": x.dtype == torch.bfloat16 and not cuda}


# The op's epilogue: bias, the activation (codes index ACTIVATIONS), one store through strides.
OP_EPILOGUE = [
    "if HAS_BIAS:",
    "    " + BIAS_ADD,
    "acc = _apply_activation(acc, ACTIVATION)",
    "tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,",
    "         acc.to(out_ptr.dtype.element_ty), mask=mask)",
]


def compile_kernel_text(module: str, name: str, text: str, namespace: dict):
    """The function `name` defined by kernel `text`, compiled under a linecache pseudo file
    (one per distinct text): `@triton.jit` and the interpreter read a kernel's source through
    `inspect`, which finds it there, so no file is written. `namespace` holds what the text
    uses besides triton and tl (helper jit functions)."""
    filename = f"<{module} {name} {hashlib.sha256(text.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    scope = {"__name__": module, "triton": triton, "tl": tl, **namespace}
    exec(compile(text, filename, "exec"), scope)
    return scope[name]


def lazy_triton(module: str, name: str, reference):
    """An op's CUDA kernel: the Triton implementation `module.name`, imported on the first
    call (the Triton module imports the op's module, so not at registration), or
    `reference` where Triton is missing. `op.register_kernel("cuda")(lazy_triton(...))`."""
    def kernel(*args, **kwargs):
        try:
            impl = getattr(importlib.import_module(module), name)
        except ImportError:
            return reference(*args, **kwargs)
        return impl(*args, **kwargs)

    kernel.__doc__ = f"The Triton kernel {module}.{name}; {reference.__name__} without Triton."
    return kernel


def output_buffer(out: Optional[Tensor], shape: tuple, like: Tensor) -> Tensor:
    """`out` checked to be `shape` in `like`'s dtype and device, or a new such tensor."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be {tuple(shape)} {like.dtype} on {like.device}; got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def _op_kernel():
    """The op's kernel: TEMPLATE with the op's epilogue, t rounded by a cast to x's dtype.

    `@triton.jit` (and the interpreter) read a kernel's source through `inspect`, which finds
    this text in linecache under a pseudo file name (one per distinct text): no file is written.
    """
    name = "_low_rank_linear_kernel"
    text = kernel_source(name, ["bias_ptr", "out_ptr"],
                         ["stride_om", "stride_on", "stride_b", "HAS_BIAS: tl.constexpr",
                          "ACTIVATION: tl.constexpr"],
                         "t.to(x_ptr.dtype.element_ty)", OP_EPILOGUE)
    return compile_kernel_text(__name__, name, text, {"_apply_activation": _apply_activation})


if triton is not None:

    @triton.jit
    def _apply_activation(y, ACTIVATION: tl.constexpr):
        """Epilogue on the fp32 accumulator; codes are indices into ACTIVATIONS."""
        if ACTIVATION == 1:  # relu
            y = tl.maximum(y, 0.0)
        elif ACTIVATION == 2:  # gelu, erf form
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        elif ACTIVATION == 3:  # gelu, tanh form: 0.5*(1 + tanh(z)) == sigmoid(2z)
            z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            y = y * tl.sigmoid(2.0 * z)
        elif ACTIVATION == 4:  # silu
            y = y * tl.sigmoid(y)
        return y

    _low_rank_linear_kernel = _op_kernel()


def _default_tiling(m: int, r_pad: int, dtype: torch.dtype) -> tuple:
    """(BLOCK_M, BLOCK_K, num_stages): untuned heuristics, checked only to compile for sm_80-sm_90.

    fp32 tiles at rank 128 need ~100 KB of shared memory with 64-row blocks and three
    stages (over the 99 KB limit of sm_86), so fp32 uses fewer stages and smaller tiles.
    """
    wide = dtype == torch.float32 and r_pad > 64
    block_m = 16 if m < 64 else (32 if wide else 64)
    block_k = 16 if wide else (64 if r_pad <= 64 else 32)
    return block_m, block_k, (2 if dtype == torch.float32 else 3)


def low_rank_linear_triton(
    x: Tensor,
    v: Tensor,
    u: Tensor,
    bias: Optional[Tensor] = None,
    activation: str = "none",
    *,
    out: Optional[Tensor] = None,
    block_m: Optional[int] = None,
    block_n: int = 64,
    block_k: Optional[int] = None,
    n_split: Optional[int] = None,
) -> Tensor:
    """Fused Triton low-rank linear; runs on CUDA, or on CPU under TRITON_INTERPRET=1.

    Grid: (cdiv(M, block_m), n_split). Each program computes its rows' rank-r
    intermediate once (r*K MACs per row) and then produces N / n_split output columns
    from it. n_split > 1 buys parallelism when M is small, at the price of recomputing
    the intermediate n_split times; the default picks the smallest n_split that fills
    the GPU, so large-M calls never recompute. ``n_split = cdiv(N, block_n)`` gives one
    (row block, column block) tile per program.

    ``out`` (shape ``x.shape[:-1] + (N,)``, dtype of x) is written in place and
    returned; every element is written. Only ranks up to MAX_FUSED_RANK are accepted;
    the op falls back to two matmuls above that. Block sizes must be powers of two
    >= 16 (tl.dot's minimum).
    """
    n = _check_args(x, v, u, bias, activation)
    if triton is None:
        raise RuntimeError("low_rank_linear_triton needs the `triton` package, which is not importable")
    rank, k = v.shape
    if rank > MAX_FUSED_RANK:
        raise ValueError(f"low_rank_linear_triton fuses ranks up to {MAX_FUSED_RANK}; got r={rank} (use the op, which falls back)")
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    out = output_buffer(out, lead + (n,), x)
    if m == 0 or n == 0:
        return out
    x2 = x.reshape(m, k)
    out2 = out.view(m, n)

    r_pad = rank_block(rank)
    default_m, default_k, num_stages = _default_tiling(m, r_pad, x.dtype)
    block_m = block_m or default_m
    block_k = block_k or default_k
    m_blocks = -(-m // block_m)  # ceil: triton.cdiv is a jit function, slow from Python
    n_blocks = -(-n // block_n)
    n_split = column_splits(m_blocks, n_blocks, x.device) if n_split is None \
        else max(1, min(n_split, n_blocks))

    wrap_triton(_low_rank_linear_kernel)[(m_blocks, n_split)](
        x_ptr=x2, v_ptr=v, u_ptr=u, bias_ptr=bias, out_ptr=out2,
        M=m, N=n, K=k, R=rank,
        stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        stride_vr=v.stride(0), stride_vk=v.stride(1),
        stride_un=u.stride(0), stride_ur=u.stride(1),
        stride_b=bias.stride(0) if bias is not None else 0,
        stride_om=out2.stride(0), stride_on=out2.stride(1),
        HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATIONS.index(activation),
        **dot_constexprs(x),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        R_PAD=r_pad,
        num_warps=4,
        num_stages=num_stages,
    )
    return out


def _low_rank_linear_default(x: Tensor, v: Tensor, u: Tensor, bias: Optional[Tensor] = None,
                             activation: str = "none") -> Tensor:
    """Non-CPU devices: the fused kernel on CUDA when the rank is small and the rows fill the
    GPU without column splits (`fused_fills_gpu`), else two matmuls.

    Its signature is the op's schema; both paths validate the arguments.
    """
    if x.device.type == "cuda" and v.dim() == 2 and v.shape[0] <= MAX_FUSED_RANK and \
            fused_fills_gpu(math.prod(x.shape[:-1]), u.shape[0], x.device):
        return low_rank_linear_triton(x, v, u, bias, activation)
    return low_rank_linear_reference(x, v, u, bias, activation)


if triton is not None:
    low_rank_linear = torch.library.triton_op("effc::low_rank_linear", _low_rank_linear_default, mutates_args=())
else:
    low_rank_linear = torch.library.custom_op("effc::low_rank_linear", _low_rank_linear_default, mutates_args=())

low_rank_linear.register_kernel("cpu")(low_rank_linear_reference)


@low_rank_linear.register_fake
def _low_rank_linear_fake(x, v, u, bias=None, activation="none"):
    """Shape propagation only; validates so bad calls fail at trace time too."""
    n = _check_args(x, v, u, bias, activation)
    return x.new_empty(tuple(x.shape[:-1]) + (n,))
