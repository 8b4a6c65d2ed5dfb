"""Pointwise groups: one program per XBLOCK output elements, every op in registers.

The kernel walks the output in its memory order (eager's layout for these ops, usually
row-major): the output offset is the linear index itself. An input with the output's shape and
layout is read at the same offset ("dense"); any other input (broadcast, transposed, sliced) is
read through per-dim indices and strides passed at launch (stride 0 would be wasted work, so
broadcast dims are left out of the index expression). Sizes known at compile time are baked
in; dynamic ones become `ks<k>` arguments read from the tensors at run time.

`cat` fuses too (rotary embedding's `q * cos + cat((-q2, q1)) * sin` is one kernel): each
operand is computed in its own index range (`_Range`: the cat dim's index shifted by the
operand's offset, lanes outside the operand masked off) and `tl.where` picks, per lane, the
operand it lies in. Inputs read there broadcast against the operand's shape, not the output's,
so strided inputs get the strides of their own dims at launch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re

import sympy
import torch
import torch.fx as fx

from effc.compiler.lowering.codegen.common import (TL_DTYPE, CodegenError, assign, Source,
                                          broadcast_dims, describe, dim_indices, expr, jit_def,
                                          memory_order, module_text, output_order,
                                          size_symbols, strides_of, texpr)
from effc.compiler.lowering.codegen.launch import (NO_FMA, Launcher, Unfit, alloc, cdiv,
                                                  single_or_tuple)
from effc.compiler.lowering.ops import meta
from effc.compiler.lowering.partition import Group

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
    in_shapes: list[tuple]  # each input's own shape (sympy): a cat operand's need not broadcast
    out_dtypes: list[torch.dtype]
    xnumel_arg: bool


@dataclasses.dataclass(frozen=True)
class _Range:
    """Where values are computed: the index along each logical dim (a kernel variable) and the
    live lanes. The output's own range is `xmask` over x0, x1, ...; a cat operand is computed in
    a sub-range: its index along the cat dim shifted by the operand's offset, and lanes outside
    the operand masked off, so its loads never read past the operand."""

    name: str                # "" for the output's range, "_c1", "_c2"... (a variable suffix)
    index: tuple[str, ...]   # per logical dim
    mask: str
    shape: tuple             # the shape of the values computed here


def _same_order(a: list[int], b: list[int], shape: tuple) -> bool:
    return [k for k in a if shape[k] != 1] == [k for k in b if shape[k] != 1]


class _Body:
    """The kernel's lines: each node's value in each range it is needed in, computed once."""

    def __init__(self, group: Group, order: list[int]):
        self.group, self.order, self.shape = group, order, group.shape
        self.pos = {k: j for j, k in enumerate(order)}
        self.root = _Range("", tuple(f"x{self.pos[k]}" for k in range(len(self.shape))),
                           "xmask", tuple(self.shape))
        self.loads: list[str] = []   # loads in the output's range: first, as they always were
        self.lines: list[str] = []
        self.values: dict[tuple, str] = {}
        self.ranges: dict[tuple, _Range] = {}
        self.inputs = {n: i for i, n in enumerate(group.inputs)}
        self.index = {n: j for j, n in enumerate(group.nodes)}
        self.plans: list[InputPlan] = []
        self.needs_bf16 = False
        for inp in group.inputs:
            in_shape = meta(inp)[0]
            lead = len(self.shape) - len(in_shape)
            if lead < 0:
                raise CodegenError(f"input of rank {len(in_shape)} in an output of rank "
                                   f"{len(self.shape)}")
            st = strides_of(inp)
            own = memory_order(in_shape, st) if st is not None else None
            dense = (tuple(in_shape) == tuple(self.shape) and own is not None
                     and _same_order(own, order, self.shape))
            dims = [] if dense else [j for j, k in enumerate(order)
                                     if k >= lead and in_shape[k - lead] != 1]
            self.plans.append(InputPlan(dense, dims))

    def value(self, a, rng: _Range) -> str | float:
        """The variable holding `a` in range `rng` (Python numbers are themselves)."""
        if not isinstance(a, fx.Node):
            return a
        key = (a, rng.name)
        if key not in self.values:
            self.values[key] = self._load(a, rng) if a in self.inputs else self._compute(a, rng)
        return self.values[key]

    def _load(self, inp: fx.Node, rng: _Range) -> str:
        i, plan = self.inputs[inp], self.plans[self.inputs[inp]]
        broadcast_dims(meta(inp)[0], rng.shape)  # raises if it does not broadcast
        if plan.dense and rng is not self.root:
            raise CodegenError(f"{inp.name} has the output's shape inside a cat operand")
        if plan.dense:
            offset, mask = "xindex", ", mask=xmask, other=0.0"
        elif plan.dims:
            offset = " + ".join(f"{rng.index[self.order[j]]} * in{i}_stride{j}" for j in plan.dims)
            mask = f", mask={rng.mask}, other=0.0"
        else:
            offset, mask = "0", ""  # one element broadcast everywhere
        var = f"a{i}{rng.name}"
        line = f"{var} = tl.load(in{i} + {offset}{mask}).to(tl.float32)  # {inp.name}"
        (self.loads if rng is self.root else self.lines).append(line)
        return var

    def _compute(self, n: fx.Node, rng: _Range) -> str:
        op, dtype = self.group.ops[n], meta(n)[1]
        var = f"v{self.index[n]}{rng.name}"
        if op.name == "cat":
            return self._cat(n, op, rng, var)
        args = [self.value(a, rng) for a in op.operands]
        self.lines.append(f"# {describe(n)}" + (f"  [in {rng.name[1:]}]" if rng.name else ""))
        self.lines += assign(var, expr(op, args, dtype), dtype)
        self.needs_bf16 |= dtype == torch.bfloat16
        return var

    def _cat(self, n: fx.Node, op, rng: _Range, var: str) -> str:
        """Each operand in its sub-range, then the one each lane lies in (no rounding: the
        operands already have the cat's dtype)."""
        d, sizes = op.params["dim"], op.params["sizes"]
        idx, ends = rng.index[d], list(itertools.accumulate(sizes))
        self.lines.append(f"# {describe(n)}: operands along dim {d} end at {ends}")
        parts = [self.value(a, self._sub_range(rng, d, end - size, end))
                 for a, size, end in zip(op.operands, sizes, ends)]
        picked = parts[-1]
        for part, end in zip(reversed(parts[:-1]), reversed(ends[:-1])):
            picked = f"tl.where({idx} < {end}, {part}, {picked})"
        self.lines.append(f"{var} = {picked}" + (f"  # in {rng.name[1:]}" if rng.name else ""))
        return var

    def _sub_range(self, rng: _Range, d: int, lo: int, hi: int) -> _Range:
        if lo == 0 and hi == int(rng.shape[d]):
            return rng  # a cat of one operand (a copy): the whole range
        key = (rng.name, d, lo, hi)
        if key not in self.ranges:
            name = f"c{len(self.ranges) + 1}"
            idx = rng.index[d]
            bounds = ([f"({idx} >= {lo})"] if lo > 0 else []) + (
                [f"({idx} < {hi})"] if hi < int(rng.shape[d]) else [])
            self.lines.append(f"{name}_mask = " + " & ".join([rng.mask] + bounds))
            index = list(rng.index)
            if lo > 0:
                index[d] = f"{name}_x{self.pos[d]}"
                self.lines.append(f"{index[d]} = {idx} - {lo}")
            shape = rng.shape[:d] + (sympy.Integer(hi - lo),) + rng.shape[d + 1:]
            self.ranges[key] = _Range(f"_{name}", tuple(index), f"{name}_mask", shape)
        return self.ranges[key]


def generate(group: Group) -> Source:
    name, shape = group.kernel_name(), group.shape
    order = output_order(group.outputs, shape)
    it_shape, dynamic = size_symbols([shape[k] for k in order])
    xindex = sympy.Symbol("xindex", integer=True, nonnegative=True)
    index = dim_indices(xindex, it_shape)
    numel = sympy.Mul(*it_shape)
    xnumel_arg = not numel.is_Integer

    body = _Body(group, order)
    for n in group.nodes:
        if tuple(meta(n)[0]) == tuple(shape):  # others: cat operands, computed where read
            body.value(n, body.root)
    params = [f"in{i}" for i in range(len(group.inputs))]
    strides = [f"in{i}_stride{j}" for i, p in enumerate(body.plans) for j in p.dims]
    stores, out_dtypes = [], []
    for j, out in enumerate(group.outputs):
        dtype = meta(out)[1]
        out_dtypes.append(dtype)
        params.append(f"out{j}")
        stores.append(f"tl.store(out{j} + xindex, {body.values[(out, '')]}.to({TL_DTYPE[dtype]}), "
                      f"mask=xmask)  # {out.name}")
    text = "\n".join(body.loads + body.lines)
    used_dims = [j for j in range(len(order)) if re.search(rf"\bx{j}\b", text)]
    lines = ["xindex = tl.program_id(0).to(tl.int64) * XBLOCK + tl.arange(0, XBLOCK)",
             f"xmask = xindex < {'xnumel' if xnumel_arg else texpr(numel)}"]
    lines += [f"x{j} = {texpr(index[j])}" for j in used_dims]
    lines += body.loads + body.lines + stores
    params += (["xnumel"] if xnumel_arg else []) + [f"ks{k}" for k in dynamic] + strides
    params.append("XBLOCK: tl.constexpr")
    text = jit_def(name, params, lines)
    summary = (f"Pointwise over {len(group.nodes)} FX nodes ({group.describe()}), output shape "
               f"{tuple(shape)}, memory order {order}; inputs: "
               + ", ".join(f"in{i}={n.name}" for i, n in enumerate(group.inputs))
               + "; outputs: " + ", ".join(f"out{j}={n.name}" for j, n in enumerate(group.outputs)))
    plan = PointwisePlan(shape, order, dynamic, body.plans,
                         [meta(n)[0] for n in group.inputs], out_dtypes, xnumel_arg)
    return Source(name, "pointwise",
                  module_text(name, "pointwise", summary, text, body.needs_bf16), plan)


class PointwiseLauncher(Launcher):
    kind = "pointwise"

    @functools.cached_property
    def _static(self) -> tuple[list, list[list]]:
        """The output's and each input's sizes as ints, None where symbolic (read per call)."""
        def ints(shape):
            return [int(s) if s.is_Integer else None for s in shape]
        return ints(self.plan.shape), [ints(w) for w in self.plan.in_shapes]

    def _shape(self, inputs) -> list[int]:
        """The output shape at run time (Unfit if the inputs do not fit the kernel): static
        sizes are the generated ones; a dynamic size is read from an input that has it."""
        out_static, in_static = self._static
        shape = list(out_static)
        for t, want in zip(inputs, in_static):
            if t.dim() != len(want):
                raise Unfit(f"an input of rank {t.dim()} at run time, kernel generated for "
                            f"{len(want)}")
            lead = len(shape) - t.dim()
            for i, (got, w) in enumerate(zip(t.shape, want)):
                if w is not None:
                    if w != got:
                        raise Unfit(f"an input's dim {i} is {got} at run time, kernel generated "
                                    f"for {w}")
                elif shape[i + lead] is None:
                    shape[i + lead] = got
                elif shape[i + lead] != got:
                    raise Unfit(f"inputs disagree on dim {i + lead}: {shape[i + lead]} and {got}")
        if None in shape:
            raise Unfit(f"no input gives dim {shape.index(None)} at run time")
        return shape

    def launch(self, *inputs):
        p = self.plan
        shape = self._shape(inputs)
        device = inputs[0].device
        outs = [alloc(shape, dtype, device, p.order) for dtype in p.out_dtypes]
        numel = math.prod(shape)
        if numel == 0:
            return single_or_tuple(outs)
        it_shape = [shape[k] for k in p.order]
        permuted = p.order != sorted(p.order)
        args, strides = [], []
        for t, ip in zip(inputs, p.inputs):
            if ip.dense:  # contiguous(): a no-op for the layout the kernel was generated for
                args.append((t.permute(p.order) if permuted else t).contiguous())
                continue
            args.append(t)  # strides of its own dims, aligned to the output's trailing dims
            own, lead = t.stride(), len(shape) - t.dim()
            strides += [own[p.order[j] - lead] for j in ip.dims]
        args += [o.permute(p.order) if permuted else o for o in outs]  # iteration order
        args += ([numel] if p.xnumel_arg else []) + [it_shape[k] for k in p.dynamic] + strides
        self.kernel[(cdiv(numel, XBLOCK),)](*args, XBLOCK=XBLOCK, **NO_FMA)
        return single_or_tuple(outs)
