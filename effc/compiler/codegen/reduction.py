"""Row groups: reductions over the last dim with their pointwise prologue and epilogue.

A program holds RBLOCK whole rows ([RBLOCK, BLOCK_N] registers, BLOCK_N = next power of two
>= N), so softmax, LayerNorm and RMSNorm read their input once and every value stays in
registers: full-row values are [RBLOCK, BLOCK_N] tiles, reduced values [RBLOCK, 1], and Triton
broadcasting mixes them as torch does. Padding lanes are masked to the reduction's identity
before each reduction. Rows longer than MAX_BLOCK_N run eagerly (a looped reduction is future
work).
"""

from __future__ import annotations

import dataclasses
import math

import sympy
import torch

from effc.compiler.codegen.common import (TL_DTYPE, assign, CodegenError, Source, broadcast_dims,
                                          describe, dim_indices, expr, jit_def,
                                          module_text, next_pow2, operand, row_major,
                                          rounded, scalar, size_symbols, strides_of, texpr)
from effc.compiler.codegen.launch import Launcher, alloc, check_static, single_or_tuple
from effc.compiler.ops import Op, meta
from effc.compiler.partition import Group

MAX_BLOCK_N = 16384
TILE = 4096  # elements per program: RBLOCK * BLOCK_N


@dataclasses.dataclass
class RowInput:
    mode: str          # "full" (dense [*R, N]), "row" (dense [*R, 1]) or "strided"
    dims: list[int]    # strided: dims the input varies along (last dim = the column)


@dataclasses.dataclass
class RowPlan:
    shape: tuple
    dynamic: list[int]
    inputs: list[RowInput]
    outputs: list[tuple[torch.dtype, bool]]  # (dtype, reduced)
    rnumel_arg: bool


def _reduction_lines(v: str, op: Op, a: list[str], n_size: str) -> list[str]:
    """Lines computing reduction/row op `op` into variable `v` (masked to the row's lanes)."""
    x = a[0]
    row_sum = lambda e: f"tl.sum(tl.where(cmask, {e}, 0.0), axis=1)[:, None]"
    if op.name == "sum":
        return [f"{v} = {row_sum(x)}"]
    if op.name == "mean":
        return [f"{v} = {row_sum(x)} / {n_size}"]
    if op.name == "amax":
        return [f"{v} = tl.max(tl.where(cmask, {x}, float('-inf')), axis=1)[:, None]"]
    if op.name == "softmax":
        return [f"{v}_max = tl.max(tl.where(cmask, {x}, float('-inf')), axis=1)[:, None]",
                f"{v}_exp = tl.exp({x} - {v}_max)",
                f"{v} = {v}_exp / {row_sum(f'{v}_exp')}"]
    eps = scalar(op.params["eps"])
    if op.name == "layer_norm":
        lines = [f"{v}_mean = {row_sum(x)} / {n_size}",
                 f"{v}_xc = tl.where(cmask, {x} - {v}_mean, 0.0)",
                 f"{v}_var = tl.sum({v}_xc * {v}_xc, axis=1)[:, None] / {n_size}",
                 f"{v} = {v}_xc * tl.rsqrt({v}_var + {eps})"]
    elif op.name == "rms_norm":
        lines = [f"{v}_ms = {row_sum(f'{x} * {x}')} / {n_size}",
                 f"{v} = {x} * tl.rsqrt({v}_ms + {eps})"]
    else:
        raise CodegenError(f"no row code for {op.name}")
    if len(a) > 1 and op.operands[1] is not None:
        lines.append(f"{v} = {v} * {a[1]}")
    if len(a) > 2 and op.operands[2] is not None:
        lines.append(f"{v} = {v} + {a[2]}")
    return lines


def generate(group: Group) -> Source:
    name, shape = group.kernel_name(), group.shape
    full, reduced = tuple(shape), group.reduced_shape
    for out in group.outputs:
        if not row_major(meta(out)[0], strides_of(out)):
            raise CodegenError(f"output {out.name} is not row-major in eager (strides "
                               f"{strides_of(out)}); row kernels write row-major outputs")
    ks, dynamic = size_symbols(shape)
    last = len(shape) - 1
    n_size = f"ks{last}" if last in dynamic else str(int(ks[last]))
    rindex = sympy.Symbol("rindex", integer=True, nonnegative=True)
    row_index = dim_indices(rindex, ks[:-1])
    rnumel = sympy.Mul(*ks[:-1])
    rnumel_arg = not rnumel.is_Integer

    params, strides, loads, plans, names = [], [], [], [], {}
    used: set[int] = set()
    for i, inp in enumerate(group.inputs):
        in_shape = meta(inp)[0]
        varies = broadcast_dims(in_shape, shape)
        st = strides_of(inp)
        if in_shape == full and row_major(in_shape, st):
            mode, dims, offset, mask = "full", [], f"rindex * {n_size} + cindex", "mask"
        elif in_shape == reduced and row_major(in_shape, st):
            mode, dims, offset, mask = "row", [], "rindex", "rmask"
        else:
            mode, dims = "strided", [k for k in range(len(shape)) if varies[k]]
            terms = [f"r{k} * in{i}_stride{k}" for k in dims if k != last]
            terms += [f"cindex * in{i}_stride{last}"] if last in dims else []
            offset = " + ".join(terms) or "0"
            rows, cols = any(k != last for k in dims), last in dims
            mask = "mask" if rows and cols else "rmask" if rows else "cmask" if cols else None
            used.update(k for k in dims if k != last)
            strides += [f"in{i}_stride{k}" for k in dims]
        plans.append(RowInput(mode, dims))
        params.append(f"in{i}")
        names[inp] = f"a{i}"
        masked = f", mask={mask}, other=0.0" if mask else ""
        loads.append(f"a{i} = tl.load(in{i} + {offset}{masked}).to(tl.float32)  # {inp.name}")

    lines = ["rindex = tl.program_id(0).to(tl.int64) * RBLOCK + tl.arange(0, RBLOCK)[:, None]",
             f"rmask = rindex < {'rnumel' if rnumel_arg else texpr(rnumel)}",
             "cindex = tl.arange(0, BLOCK_N)[None, :]",
             f"cmask = cindex < {n_size}",
             "mask = rmask & cmask"]
    lines += [f"r{k} = {texpr(row_index[k])}" for k in sorted(used)]
    lines += loads
    needs_bf16 = False
    for j, n in enumerate(group.nodes):
        op, dtype = group.ops[n], meta(n)[1]
        args = [operand(a, names) if a is not None else "None" for a in op.operands]
        lines.append(f"# {describe(n)}")
        if op.kind == "reduction":
            lines += _reduction_lines(f"v{j}", op, args, n_size)
            if dtype != torch.float32:
                lines.append(f"v{j} = {rounded(f'v{j}', dtype)}")
        else:
            lines += assign(f"v{j}", expr(op, args, dtype), dtype)
        needs_bf16 |= dtype == torch.bfloat16
        names[n] = f"v{j}"
    outputs = []
    for j, out in enumerate(group.outputs):
        out_shape, dtype, _ = meta(out)
        is_reduced = out_shape == reduced and out_shape != full
        if not is_reduced and out_shape != full:
            raise CodegenError(f"output {out.name} has shape {out_shape}, not a row or a full shape")
        outputs.append((dtype, is_reduced))
        params.append(f"out{j}")
        value = f"tl.broadcast_to({names[out]}, [RBLOCK, {'1' if is_reduced else 'BLOCK_N'}])"
        where = ("rindex", "rmask") if is_reduced else (f"rindex * {n_size} + cindex", "mask")
        lines.append(f"tl.store(out{j} + {where[0]}, {value}.to({TL_DTYPE[dtype]}), "
                     f"mask={where[1]})  # {out.name}")
    params += (["rnumel"] if rnumel_arg else []) + [f"ks{k}" for k in dynamic] + strides
    params += ["RBLOCK: tl.constexpr", "BLOCK_N: tl.constexpr"]
    body = jit_def(name, params, lines)
    summary = (f"Row group over {len(group.nodes)} FX nodes ({group.describe()}); rows of shape "
               f"{full}, reduced over the last dim; inputs: "
               + ", ".join(f"in{i}={n.name}" for i, n in enumerate(group.inputs))
               + "; outputs: " + ", ".join(f"out{j}={n.name}" for j, n in enumerate(group.outputs)))
    plan = RowPlan(full, dynamic, plans, outputs, rnumel_arg)
    return Source(name, "row", module_text(name, "row", summary, body, needs_bf16), plan)


class RowLauncher(Launcher):
    kind = "row"

    def unsupported(self, *inputs):
        shape = torch.broadcast_shapes(*(t.shape for t in inputs))
        why = check_static(shape, self.plan.shape)
        if why is None and next_pow2(shape[-1]) > MAX_BLOCK_N:
            why = f"rows of {shape[-1]} elements are longer than one block ({MAX_BLOCK_N})"
        return why

    def launch(self, *inputs):
        import triton

        p = self.plan
        shape = torch.broadcast_shapes(*(t.shape for t in inputs))
        row_shape = shape[:-1] + (1,)
        device = inputs[0].device
        outs = [alloc(row_shape if red else shape, dtype, device) for dtype, red in p.outputs]
        rows, n = math.prod(shape[:-1]), shape[-1]
        if rows == 0 or n == 0:
            return single_or_tuple(outs)
        args, strides = [], []
        for t, ip in zip(inputs, p.inputs):
            if ip.mode == "full":
                args.append(t.expand(shape).contiguous())
            elif ip.mode == "row":
                args.append(t.expand(row_shape).contiguous())
            else:
                view = t.expand(shape)
                args.append(view)
                strides += [view.stride(k) for k in ip.dims]
        block_n = next_pow2(n)
        rblock = max(1, min(next_pow2(rows), TILE // block_n))
        args += outs + ([rows] if p.rnumel_arg else []) + [shape[k] for k in p.dynamic] + strides
        self.kernel[(triton.cdiv(rows, rblock),)](*args, RBLOCK=rblock, BLOCK_N=block_n,
                                                  num_warps=4 if rblock * block_n <= 2048 else 8)
        return single_or_tuple(outs)
