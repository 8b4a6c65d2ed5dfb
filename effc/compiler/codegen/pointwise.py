"""Pointwise groups: one program per XBLOCK output elements, every op in registers.

The kernel walks the output in its memory order (eager's layout for these ops, usually
row-major): the output offset is the linear index itself. An input with the output's shape and
layout is read at the same offset ("dense"); any other input (broadcast, transposed, sliced) is
read through per-dim indices and strides passed at launch (stride 0 would be wasted work, so
broadcast dims are left out of the index expression). Sizes known at compile time are baked
in; dynamic ones become `ks<k>` arguments read from the tensors at run time.
"""

from __future__ import annotations

import dataclasses
import math

import sympy
import torch

from effc.compiler.codegen.common import (TL_DTYPE, assign, Source, broadcast_dims,
                                          describe, dim_indices, expr, jit_def, memory_order,
                                          module_text, operand, output_order,
                                          size_symbols, strides_of, texpr)
from effc.compiler.codegen.launch import Launcher, alloc, check_static, single_or_tuple
from effc.compiler.ops import meta
from effc.compiler.partition import Group

XBLOCK = 1024


@dataclasses.dataclass
class InputPlan:
    dense: bool
    dims: list[int]  # iteration-space dims the input varies along (strided inputs only)


@dataclasses.dataclass
class PointwisePlan:
    shape: tuple            # the group's output shape (sympy; logical dim order)
    order: list[int]        # logical dims from outermost to innermost in memory
    dynamic: list[int]      # iteration-space dims passed as `ks<k>`
    inputs: list[InputPlan]
    out_dtypes: list[torch.dtype]
    xnumel_arg: bool


def _same_order(a: list[int], b: list[int], shape: tuple) -> bool:
    return [k for k in a if shape[k] != 1] == [k for k in b if shape[k] != 1]


def generate(group: Group) -> Source:
    name, shape = group.kernel_name(), group.shape
    order = output_order(group.outputs, shape)
    it_shape, dynamic = size_symbols([shape[k] for k in order])
    xindex = sympy.Symbol("xindex", integer=True, nonnegative=True)
    index = dim_indices(xindex, it_shape)
    numel = sympy.Mul(*it_shape)
    xnumel_arg = not numel.is_Integer

    params, strides, loads, plans = [], [], [], []
    used_dims: set[int] = set()
    names: dict = {}
    for i, inp in enumerate(group.inputs):
        in_shape, _, _ = meta(inp)
        varies = broadcast_dims(in_shape, shape)
        st = strides_of(inp)
        own = memory_order(in_shape, st) if st is not None else None
        dense = tuple(in_shape) == tuple(shape) and own is not None and _same_order(own, order, shape)
        dims = [] if dense else [j for j, k in enumerate(order) if varies[k]]
        plans.append(InputPlan(dense, dims))
        params.append(f"in{i}")
        strides += [f"in{i}_stride{j}" for j in dims]
        used_dims.update(dims)
        if dense:
            offset, mask = "xindex", ", mask=xmask, other=0.0"
        elif dims:
            offset = " + ".join(f"x{j} * in{i}_stride{j}" for j in dims)
            mask = ", mask=xmask, other=0.0"
        else:
            offset, mask = "0", ""  # one element broadcast everywhere
        names[inp] = f"a{i}"
        loads.append(f"a{i} = tl.load(in{i} + {offset}{mask}).to(tl.float32)  # {inp.name}")

    lines = ["xindex = tl.program_id(0).to(tl.int64) * XBLOCK + tl.arange(0, XBLOCK)",
             f"xmask = xindex < {'xnumel' if xnumel_arg else texpr(numel)}"]
    lines += [f"x{j} = {texpr(index[j])}" for j in sorted(used_dims)]
    lines += loads
    needs_bf16 = False
    for j, n in enumerate(group.nodes):
        op, dtype = group.ops[n], meta(n)[1]
        lines.append(f"# {describe(n)}")
        lines += assign(f"v{j}", expr(op, [operand(a, names) for a in op.operands], dtype), dtype)
        needs_bf16 |= dtype == torch.bfloat16
        names[n] = f"v{j}"
    out_dtypes = []
    for j, out in enumerate(group.outputs):
        dtype = meta(out)[1]
        out_dtypes.append(dtype)
        params.append(f"out{j}")
        lines.append(f"tl.store(out{j} + xindex, {names[out]}.to({TL_DTYPE[dtype]}), mask=xmask)"
                     f"  # {out.name}")
    params += (["xnumel"] if xnumel_arg else []) + [f"ks{k}" for k in dynamic] + strides
    params.append("XBLOCK: tl.constexpr")
    body = jit_def(name, params, lines)
    summary = (f"Pointwise over {len(group.nodes)} FX nodes ({group.describe()}), output shape "
               f"{tuple(shape)}, memory order {order}; inputs: "
               + ", ".join(f"in{i}={n.name}" for i, n in enumerate(group.inputs))
               + "; outputs: " + ", ".join(f"out{j}={n.name}" for j, n in enumerate(group.outputs)))
    plan = PointwisePlan(shape, order, dynamic, plans, out_dtypes, xnumel_arg)
    return Source(name, "pointwise", module_text(name, "pointwise", summary, body, needs_bf16), plan)


class PointwiseLauncher(Launcher):
    kind = "pointwise"

    def unsupported(self, *inputs):
        shape = torch.broadcast_shapes(*(t.shape for t in inputs))
        return check_static(shape, self.plan.shape)

    def launch(self, *inputs):
        import triton

        p = self.plan
        shape = torch.broadcast_shapes(*(t.shape for t in inputs))
        device = inputs[0].device
        outs = [alloc(shape, dtype, device, p.order) for dtype in p.out_dtypes]
        numel = math.prod(shape)
        if numel == 0:
            return single_or_tuple(outs)
        it_shape = [shape[k] for k in p.order]
        args, strides = [], []
        for t, ip in zip(inputs, p.inputs):
            view = t.expand(shape).permute(p.order)
            if ip.dense:
                view = view.contiguous()  # a no-op for the layout the kernel was generated for
            args.append(view)
            strides += [view.stride(j) for j in ip.dims]
        args += [o.permute(p.order) for o in outs]  # contiguous in iteration order
        args += ([numel] if p.xnumel_arg else []) + [it_shape[k] for k in p.dynamic] + strides
        self.kernel[(triton.cdiv(numel, XBLOCK),)](*args, XBLOCK=XBLOCK)
        return single_or_tuple(outs)

