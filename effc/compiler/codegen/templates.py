"""GEMM-like templates with an epilogue slot: `low_rank_linear` and what follows it.

The template is the effc low-rank GEMM (effc/kernels/low_rank.py): each program computes
t = x_rows @ v.T ([BLOCK_M, R_PAD], fp32) once, keeps it in registers, and produces its
output tiles acc = t @ u.T (+ bias). The slot after `acc` receives generated code: the
op's own activation, then the fused pointwise nodes (activation, scale, residual add, gating
multiply by another tensor, casts), each rounded to its dtype as eager would, and one store per
materialized node. Extra epilogue operands are read as [M, N] tiles through strides given at
launch (0 for broadcast dims, e.g. a bias-like [N] vector).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from effc.compiler.codegen.common import (TL_DTYPE, CodegenError, Source, describe, expr,
                                          module_text, next_pow2, operand, rounded, row_major,
                                          strides_of)
from effc.compiler.codegen.launch import Launcher, alloc, check_static, single_or_tuple
from effc.compiler.ops import Op, meta
from effc.compiler.partition import Group

LOW_RANK = '''
@triton.jit
def {name}(
    x_ptr, v_ptr, u_ptr, {operand_params}
    M, N, K, R,
    stride_xm, stride_xk, stride_vr, stride_vk, stride_un, stride_ur, {stride_params}
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R

    # t = x @ v.T for this program's rows, once; rank padding is zero
    t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x_blk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        v_t_blk = tl.load(v_ptr + offs_k[:, None] * stride_vk + offs_r[None, :] * stride_vr,
                          mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if UPCAST_DOT:  # the interpreter's dot multiplies bf16 tiles as integers
            x_blk = x_blk.to(tl.float32)
            v_t_blk = v_t_blk.to(tl.float32)
        t = tl.dot(x_blk, v_t_blk, t, input_precision=INPUT_PRECISION)
    # eager's first matmul returns t in the input dtype
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
        # ---- epilogue (generated) ----
{epilogue}'''

_ROUND_T = {torch.float32: "t", torch.float16: "t.to(tl.float16)",
            torch.bfloat16: "round_to_bf16(t).to(tl.bfloat16)"}


@dataclasses.dataclass
class GemmPlan:
    shape: tuple               # output shape (sympy)
    x: int                     # positions of the GEMM operands among the launcher's inputs
    v: int
    u: int
    bias: int | None
    epilogue: list[int]        # positions of the epilogue's extra operands
    out_dtypes: list[torch.dtype]


def generate(group: Group) -> Source:
    gemm = group.gemm
    op: Op = group.ops[gemm]
    if op.name != "low_rank_linear":
        raise CodegenError(f"no template for {op.name}")
    name, dtype = group.kernel_name(), meta(gemm)[1]
    x, v, u, bias = op.operands
    position = {n: i for i, n in enumerate(group.inputs)}
    for out in group.outputs:
        if not row_major(meta(out)[0], strides_of(out)):
            raise CodegenError(f"output {out.name} is not row-major in eager")
    extra = [n for n in group.inputs
             if any(n in group.ops[m].nodes for m in group.nodes if m is not gemm)]
    for n in extra:
        in_shape = meta(n)[0]
        if len(in_shape) > len(group.shape) or any(
                a not in (1, b) for a, b in zip(in_shape[::-1], group.shape[::-1])):
            raise CodegenError(f"epilogue operand {n.name} {in_shape} does not broadcast to "
                               f"{group.shape}")

    names = {n: f"e{i}" for i, n in enumerate(extra)}
    lines = [f"e{i} = tl.load(in{i}_ptr + offs_m[:, None] * in{i}_sm + offs_n[None, :] * in{i}_sn,"
             f" mask=mask, other=0.0).to(tl.float32)  # {n.name}" for i, n in enumerate(extra)]
    value = "acc"
    if bias is not None:
        lines.append("acc += tl.load(bias_ptr + offs_n * stride_b, mask=mask_n, other=0.0)"
                     ".to(tl.float32)[None, :]")
    needs_bf16 = dtype == torch.bfloat16
    for j, n in enumerate(group.nodes):
        node_dtype = meta(n)[1]
        if n is gemm and op.params["activation"] != "none":
            # the op's reference applies its activation to the linear's output in its dtype
            act = op.params["activation"]
            act_op = Op("pointwise", "gelu", (), {"approximate": "tanh"}) if act == "gelu_tanh" \
                else Op("pointwise", act, ())
            lines.append(f"lin = {rounded('acc', node_dtype)}")
            value = expr(act_op, ["lin"])
        elif n is gemm:
            value = "acc"
        else:
            node_op = group.ops[n]
            value = expr(node_op, [operand(a, names) for a in node_op.operands], node_dtype)
        lines += [f"# {describe(n)}", f"v{j} = {value}"]
        if node_dtype != torch.float32:
            lines.append(f"v{j} = {rounded(f'v{j}', node_dtype)}")
            needs_bf16 |= node_dtype == torch.bfloat16
        names[n] = f"v{j}"
    out_dtypes = []
    for j, out in enumerate(group.outputs):
        out_dtypes.append(meta(out)[1])
        lines.append(f"tl.store(out{j}_ptr + offs_m[:, None] * N + offs_n[None, :], "
                     f"{names[out]}.to({TL_DTYPE[meta(out)[1]]}), mask=mask)  # {out.name}")
    operand_params = (["bias_ptr"] if bias is not None else []) + [f"in{i}_ptr" for i in range(len(extra))]
    operand_params += [f"out{j}_ptr" for j in range(len(group.outputs))]
    stride_params = (["stride_b"] if bias is not None else []) + [
        p for i in range(len(extra)) for p in (f"in{i}_sm", f"in{i}_sn")]
    body = LOW_RANK.format(
        name=name, operand_params="".join(p + ", " for p in operand_params),
        stride_params="".join(p + ", " for p in stride_params), round_t=_ROUND_T[dtype],
        epilogue="".join(f"        {line}\n" for line in lines))
    summary = (f"low_rank_linear ({gemm.name}: x={x.name}, rank {int(meta(v)[0][0])}) with an "
               f"epilogue of {len(group.nodes) - 1} FX nodes ({group.describe()}); output shape "
               f"{tuple(group.shape)}; epilogue operands: "
               + (", ".join(f"in{i}={n.name}" for i, n in enumerate(extra)) or "none")
               + "; outputs: " + ", ".join(f"out{j}={n.name}" for j, n in enumerate(group.outputs)))
    plan = GemmPlan(group.shape, position[x], position[v], position[u],
                    position[bias] if bias is not None else None,
                    [position[n] for n in extra], out_dtypes)
    return Source(name, "gemm", module_text(name, "gemm", summary, body, needs_bf16), plan)


def _tiling(m: int, n: int, k: int, r_pad: int, dtype: torch.dtype, cuda: bool) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_stages): untuned; autotuning on GPU is future work.

    fp32 tiles at rank > 64 are kept small so shared memory fits on sm_80..sm_90.
    """
    block_m = min(64, max(16, next_pow2(m)))
    block_n = min(64, max(16, next_pow2(n)))
    block_k = min(64 if r_pad <= 64 else 32, max(16, next_pow2(k)))
    if cuda and dtype == torch.float32 and r_pad > 64:
        block_m, block_k = min(block_m, 32), 16
    return block_m, block_n, block_k, (2 if dtype == torch.float32 else 3)


class GemmLauncher(Launcher):
    kind = "gemm"

    def _shape(self, inputs) -> tuple[int, ...]:
        p = self.plan
        return tuple(inputs[p.x].shape[:-1]) + (inputs[p.u].shape[0],)

    def unsupported(self, *inputs):
        return check_static(self._shape(inputs), self.plan.shape)

    def launch(self, *inputs):
        import triton

        p = self.plan
        x, v, u = inputs[p.x], inputs[p.v], inputs[p.u]
        shape = self._shape(inputs)
        m, k, n, r = math.prod(shape[:-1]), x.shape[-1], shape[-1], v.shape[0]
        outs = [alloc(shape, dtype, x.device) for dtype in p.out_dtypes]
        if m == 0 or n == 0:
            return single_or_tuple(outs)
        x2 = x.reshape(m, k)
        extra = [inputs[i].expand(shape).reshape(m, n) for i in p.epilogue]
        bias = [inputs[p.bias]] if p.bias is not None else []
        cuda = x.device.type == "cuda"
        r_pad = max(16, next_pow2(r))
        block_m, block_n, block_k, stages = _tiling(m, n, k, r_pad, x.dtype, cuda)
        m_blocks, n_blocks = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
        n_split = 1
        if cuda:  # fill the GPU when there are few row blocks (each split recomputes t)
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            n_split = max(1, min(triton.cdiv(2 * sms, m_blocks), n_blocks))
        tf32 = x.dtype == torch.float32 and cuda and torch.backends.cuda.matmul.allow_tf32
        args = [x2, v, u, *bias, *extra, *[o.view(m, n) for o in outs], m, n, k, r,
                x2.stride(0), x2.stride(1), v.stride(0), v.stride(1), u.stride(0), u.stride(1),
                *[b.stride(0) for b in bias], *[s for e in extra for s in e.stride()]]
        self.kernel[(m_blocks, n_split)](
            *args, INPUT_PRECISION="tf32" if tf32 else "ieee",
            UPCAST_DOT=x.dtype == torch.bfloat16 and not cuda,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, R_PAD=r_pad,
            num_warps=4, num_stages=stages)
        return single_or_tuple(outs)
