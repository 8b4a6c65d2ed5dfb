"""Row groups: reductions over the last dim with their pointwise prologue and epilogue.

Every row op is written as statistics plus a finishing expression: softmax is (row max, row
sum of exp(x - max)) then exp(x - max) / sum; LayerNorm is (mean, variance of x - mean) then
the normalized value; RMSNorm (mean square); sum/mean/amax are one statistic each. Two ways to
compute them, one generator:
- persistent (rows up to MAX_BLOCK_N): a program holds RBLOCK whole rows ([RBLOCK, BLOCK_N]
  registers, BLOCK_N = next power of two >= N), reads its inputs once, and every value stays
  in registers: full-row values are [RBLOCK, BLOCK_N] tiles, reduced values [RBLOCK, 1], and
  Triton broadcasting mixes them as torch does;
- looped (longer rows, a vocabulary-sized softmax): each statistic is one pass over the row in
  BLOCK_N chunks, accumulated in fp32 (softmax's max and denominator share one pass: online
  softmax); the full-row values a pass needs (the prologue, earlier
  row ops' outputs) are recomputed from the inputs in that pass, and a last pass computes and
  stores the full-row outputs. Reduced values live outside the loops.
Padding lanes are masked to the statistic's identity. A kernel whose row length is symbolic
gets both functions (`<name>` and `<name>_looped`); the launcher picks by the runtime length.
"""

from __future__ import annotations

import dataclasses
import math

import sympy
import torch
import torch.fx as fx

from effc.compiler.lowering.codegen.common import (TL_DTYPE, assign, CodegenError, Source, broadcast_dims,
                                          describe, dim_indices, expr, jit_def,
                                          memory_order, module_text, next_pow2, operand,
                                          row_major, scalar, size_symbols, strides_of, texpr)
from effc.compiler.lowering.codegen.launch import (NO_FMA, Launcher, alloc, broadcast, cdiv,
                                                  check_static, dense, sibling, single_or_tuple)
from effc.compiler.lowering.ops import Op, meta
from effc.compiler.lowering.partition import Group

MAX_BLOCK_N = 16384   # longest row a persistent kernel holds in registers
LOOP_BLOCK_N = 4096   # chunk of a looped kernel's passes
TILE = 4096           # elements per program: RBLOCK * BLOCK_N


@dataclasses.dataclass
class RowInput:
    mode: str          # "full" (dense [*R, N]), "row" (dense [*R, 1]) or "strided"
    dims: list[int]    # strided: dims the input varies along (last dim = the column)


@dataclasses.dataclass
class RowOutput:
    """An output buffer: full rows or one value per row (`reduced`), in eager's layout.

    A layout other than row-major (eager keeps a permuted input's layout, e.g. for a LayerNorm
    prologue's add over a transposed conv output) has its memory `order` and is written through
    the strides of `dims`, passed at launch.
    """
    dtype: torch.dtype
    reduced: bool
    order: list[int] | None = None
    dims: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RowPlan:
    shape: tuple
    dynamic: list[int]
    inputs: list[RowInput]
    outputs: list[RowOutput]
    rnumel_arg: bool
    variants: tuple[str, ...]  # jit functions in the module: "persistent" and/or "looped"
    looped_name: str | None    # the looped function's name


@dataclasses.dataclass
class Stat:
    """A per-row statistic: `combine` of `elem` over the row's lanes, then `after`.

    combine: "sum", "max", or "expsum" (sum of exp(elem - <the max statistic `of`>), softmax's
    denominator: a looped kernel computes it in the max's pass, rescaling as the max grows).
    """

    var: str
    combine: str
    elem: str
    after: str = ""
    of: str = ""


def _row_op(op: Op, a: list[str], v: str, n_size: str) -> tuple[list[Stat], str]:
    """(statistics, value) of row op `op` on operand variables `a`, computed into `v`."""
    x = a[0]
    if op.name in ("sum", "mean"):
        return [Stat(f"{v}_sum", "sum", x, f" / {n_size}" if op.name == "mean" else "")], f"{v}_sum"
    if op.name == "amax":
        return [Stat(f"{v}_max", "max", x)], f"{v}_max"
    if op.name == "softmax":
        return ([Stat(f"{v}_max", "max", x), Stat(f"{v}_sum", "expsum", x, of=f"{v}_max")],
                f"tl.exp({x} - {v}_max) / {v}_sum")
    eps = scalar(op.params["eps"]) if op.params["eps"] is not None else a[op.params["eps_at"]]
    if op.name == "layer_norm":
        stats = [Stat(f"{v}_mean", "sum", x, f" / {n_size}"),
                 Stat(f"{v}_var", "sum", f"({x} - {v}_mean) * ({x} - {v}_mean)", f" / {n_size}")]
        value = f"({x} - {v}_mean) * tl.rsqrt({v}_var + {eps})"
    elif op.name == "rms_norm":
        stats = [Stat(f"{v}_ms", "sum", f"{x} * {x}", f" / {n_size}")]
        value = f"{x} * tl.rsqrt({v}_ms + {eps})"
    else:
        raise CodegenError(f"no row code for {op.name}")
    if op.operands[1] is not None:  # the weight
        value = f"({value}) * {a[1]}"
    if op.name == "layer_norm" and op.operands[2] is not None:  # the bias
        value = f"{value} + {a[2]}"
    return stats, value


def _reduce(stat: Stat) -> str:
    """The statistic over this block's lanes, [RBLOCK, 1]."""
    if stat.combine == "sum":
        return f"tl.sum(tl.where(cmask, {stat.elem}, 0.0), axis=1)[:, None]"
    if stat.combine == "expsum":
        return f"tl.sum(tl.where(cmask, tl.exp({stat.elem} - {stat.of}), 0.0), axis=1)[:, None]"
    return f"tl.max(tl.where(cmask, {stat.elem}, float('-inf')), axis=1)[:, None]"


def _online_softmax(mx: Stat, total: Stat) -> list[str]:
    """One chunk's update of softmax's running max and its sum of exp(x - max): the sum so far
    is rescaled by exp(old max - new max). While the max is -inf (every lane so far masked or
    -inf) the sum stays 0, as eager's does, instead of exp(-inf + inf) = NaN."""
    m, s, x = mx.var, total.var, mx.elem
    return [f"{m}_new = tl.maximum({m}, {_reduce(mx)})",
            f"{s} = {s} * tl.where({m}_new == {m}, 1.0, tl.exp({m} - {m}_new))",
            f"{s} += tl.sum(tl.where(cmask & ({m}_new > float('-inf')), tl.exp({x} - {m}_new), "
            "0.0), axis=1)[:, None]",
            f"{m} = {m}_new"]


@dataclasses.dataclass
class _Body:
    """What both kernel variants are made of (built once per group)."""

    head: list[str]                     # rindex, rmask, row indices
    loads: dict[fx.Node, str]           # input -> its load line
    full: dict[fx.Node, bool]           # value is a [RBLOCK, BLOCK_N] tile (else [RBLOCK, 1])
    lines: dict[fx.Node, list[str]]     # node -> the lines computing its value
    stats: dict[fx.Node, list[Stat]]    # row ops -> their statistics
    deps: dict[fx.Node, list[fx.Node]]  # node -> nodes/inputs its value reads
    order: list[fx.Node]                # group nodes in order
    stores: dict[fx.Node, str]          # output -> its store line
    n_size: str                         # the row length: a literal, or the `ks<last>` argument


def _closure(body: _Body, roots: list[fx.Node]) -> list[fx.Node]:
    """The full-row inputs and nodes that `roots` need, in order (reduced values are at hand)."""
    seen: set[fx.Node] = set()
    stack = [r for r in roots if body.full.get(r)]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack += [d for d in body.deps.get(n, []) if body.full.get(d)]
    inputs = [n for n in body.loads if n in seen]
    return inputs + [n for n in body.order if n in seen]


def _chunk(body: _Body, roots: list[fx.Node]) -> list[str]:
    """One BLOCK_N chunk of a looped pass: lanes, loads and full-row lines for `roots`."""
    lines = ["cindex = c0 + tl.arange(0, BLOCK_N)[None, :]", f"cmask = cindex < {body.n_size}",
             "mask = rmask & cmask"]
    for n in _closure(body, roots):
        lines += [body.loads[n]] if n in body.loads else body.lines[n]
    return lines


def _looped(body: _Body) -> list[str]:
    lines = list(body.head) + [line for n, line in body.loads.items() if not body.full[n]]
    loop = f"for c0 in range(0, {body.n_size}, BLOCK_N):"
    zeros, neg_inf = "tl.zeros([RBLOCK, 1], dtype=tl.float32)", \
        "tl.full([RBLOCK, 1], float('-inf'), tl.float32)"
    for n in body.order:
        stats = body.stats.get(n, [])
        for i, stat in enumerate(stats):
            if stat.combine == "expsum":
                continue  # computed in its max's pass
            if stat.combine == "sum":
                lines.append(f"{stat.var} = {zeros}")
                update = [f"{stat.var} += {_reduce(stat)}"]
            elif i + 1 < len(stats) and stats[i + 1].of == stat.var:
                lines += [f"{stat.var} = {neg_inf}", f"{stats[i + 1].var} = {zeros}"]
                update = _online_softmax(stat, stats[i + 1])
            else:
                lines.append(f"{stat.var} = {neg_inf}")
                update = [f"{stat.var} = tl.maximum({stat.var}, {_reduce(stat)})"]
            lines.append(loop)
            lines += ["    " + line for line in _chunk(body, body.deps[n][:1]) + update]
            if stat.after:
                lines.append(f"{stat.var} = {stat.var}{stat.after}")
        if not body.full[n]:
            lines += body.lines[n]
    full_outs = [n for n in body.stores if body.full[n]]
    if full_outs:
        lines.append(loop)
        lines += ["    " + line for line in _chunk(body, full_outs)
                  + [body.stores[n] for n in full_outs]]
    return lines + [body.stores[n] for n in body.stores if not body.full[n]]


def _persistent(body: _Body) -> list[str]:
    lines = list(body.head) + ["cindex = tl.arange(0, BLOCK_N)[None, :]",
                               f"cmask = cindex < {body.n_size}", "mask = rmask & cmask"]
    lines += list(body.loads.values())
    for n in body.order:
        lines += [f"{s.var} = {_reduce(s)}{s.after}" for s in body.stats.get(n, [])]
        lines += body.lines[n]
    return lines + list(body.stores.values())


def generate(group: Group) -> Source:
    name, shape = group.kernel_name(), group.shape
    full, reduced = tuple(shape), group.reduced_shape
    ks, dynamic = size_symbols(shape)
    last = len(shape) - 1
    n_size = f"ks{last}" if last in dynamic else str(int(ks[last]))
    rindex = sympy.Symbol("rindex", integer=True, nonnegative=True)
    row_index = dim_indices(rindex, ks[:-1])
    rnumel = sympy.Mul(*ks[:-1])
    rnumel_arg = not rnumel.is_Integer

    params, strides, plans, names = [], [], [], {}
    loads: dict[fx.Node, str] = {}
    is_full: dict[fx.Node, bool] = {}
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
        is_full[inp] = mode == "full" or last in dims
        masked = f", mask={mask}, other=0.0" if mask else ""
        loads[inp] = f"a{i} = tl.load(in{i} + {offset}{masked}).to(tl.float32)  # {inp.name}"

    head: list[str] = []  # filled once the outputs have said which row indices they use too
    body = _Body(head, loads, is_full, {}, {}, {}, list(group.nodes), {}, n_size)
    needs_bf16 = False
    for j, n in enumerate(group.nodes):
        op, dtype = group.ops[n], meta(n)[1]
        args = [operand(a, names) if a is not None else "None" for a in op.operands]
        body.deps[n] = [a for a in op.operands if isinstance(a, fx.Node)]
        if op.kind == "reduction":
            body.stats[n], value = _row_op(op, args, f"v{j}", n_size)
            is_full[n] = op.name not in ("sum", "mean", "amax")
        else:
            value = expr(op, args, dtype)
            is_full[n] = any(is_full[a] for a in body.deps[n])
        body.lines[n] = [f"# {describe(n)}"] + assign(f"v{j}", value, dtype)
        needs_bf16 |= dtype == torch.bfloat16
        names[n] = f"v{j}"
    outputs, out_strides = [], []
    for j, out in enumerate(group.outputs):
        out_shape, dtype, _ = meta(out)
        is_reduced = out_shape == reduced and out_shape != full
        if not is_reduced and out_shape != full:
            raise CodegenError(f"output {out.name} has shape {out_shape}, not a row or a full shape")
        plan_out = RowOutput(dtype, is_reduced)
        if not row_major(out_shape, strides_of(out)):
            plan_out.order = memory_order(out_shape, strides_of(out))
            if plan_out.order is None:
                raise CodegenError(f"output {out.name} has a non-dense layout in eager (strides "
                                   f"{strides_of(out)})")
            plan_out.dims = [k for k in range(last) if out_shape[k] != 1]
            plan_out.dims += [] if is_reduced else [last]
        outputs.append(plan_out)
        params.append(f"out{j}")
        value = f"tl.broadcast_to({names[out]}, [RBLOCK, {'1' if is_reduced else 'BLOCK_N'}])"
        if plan_out.order is not None:
            used.update(k for k in plan_out.dims if k != last)
            terms = [f"{'cindex' if k == last else f'r{k}'} * out{j}_stride{k}"
                     for k in plan_out.dims]
            out_strides += [f"out{j}_stride{k}" for k in plan_out.dims]
            where = (" + ".join(terms) or "0", "rmask" if is_reduced else "mask")
        else:
            where = ("rindex", "rmask") if is_reduced else (f"rindex * {n_size} + cindex", "mask")
        body.stores[out] = (f"tl.store(out{j} + {where[0]}, {value}.to({TL_DTYPE[dtype]}), "
                            f"mask={where[1]})  # {out.name}")
    head += ["rindex = tl.program_id(0).to(tl.int64) * RBLOCK + tl.arange(0, RBLOCK)[:, None]",
             f"rmask = rindex < {'rnumel' if rnumel_arg else texpr(rnumel)}"]
    head += [f"r{k} = {texpr(row_index[k])}" for k in sorted(used)]
    params += (["rnumel"] if rnumel_arg else []) + [f"ks{k}" for k in dynamic] + strides
    params += out_strides + ["RBLOCK: tl.constexpr", "BLOCK_N: tl.constexpr"]
    if last in dynamic:
        variants = ("persistent", "looped")
    else:
        variants = ("persistent",) if next_pow2(int(ks[last])) <= MAX_BLOCK_N else ("looped",)
    looped_name = f"{name}_looped" if len(variants) == 2 else name if "looped" in variants else None
    bodies = []
    if "persistent" in variants:
        bodies.append(jit_def(name, params, _persistent(body)))
    if looped_name is not None:
        bodies.append(jit_def(looped_name, params, _looped(body)))
    summary = (f"Row group over {len(group.nodes)} FX nodes ({group.describe()}); rows of shape "
               f"{full}, reduced over the last dim ({' and '.join(variants)}: "
               + ("whole rows in registers" if variants == ("persistent",) else
                  "one pass over the row per statistic" if variants == ("looped",) else
                  "whole rows in registers when they fit, else a pass per statistic")
               + "); inputs: " + ", ".join(f"in{i}={n.name}" for i, n in enumerate(group.inputs))
               + "; outputs: " + ", ".join(f"out{j}={n.name}" for j, n in enumerate(group.outputs)))
    plan = RowPlan(full, dynamic, plans, outputs, rnumel_arg, variants, looped_name)
    text = module_text(name, "row", summary, "\n\n".join(bodies), needs_bf16)
    return Source(name, "row", text, plan)


class RowLauncher(Launcher):
    kind = "row"
    last_variant: str | None = None  # "persistent" or "looped": what the last launch ran

    def _kernel(self, looped: bool):
        """The jit function for this row length (the looped one is the persistent one's sibling)."""
        p = self.plan
        if looped and p.variants == ("persistent", "looped"):
            return sibling(self.kernel, p.looped_name)
        return self.kernel

    def launch(self, *inputs):
        p = self.plan
        shape = broadcast(*(t.shape for t in inputs))
        check_static(shape, p.shape)
        row_shape = shape[:-1] + (1,)
        device = inputs[0].device
        outs = [alloc(row_shape if o.reduced else shape, o.dtype, device, o.order)
                for o in p.outputs]
        rows, n = math.prod(shape[:-1]), shape[-1]
        if rows == 0 or n == 0:
            return single_or_tuple(outs)
        args, strides = [], []
        for t, ip in zip(inputs, p.inputs):
            if ip.mode == "full":
                args.append(dense(t, shape))
            elif ip.mode == "row":
                args.append(dense(t, row_shape))
            else:  # its stride along each dim it varies in (a broadcast dim never moves)
                args.append(t)
                lead = len(shape) - t.dim()
                strides += [t.stride(k - lead) for k in ip.dims]
        looped = "persistent" not in p.variants or next_pow2(n) > MAX_BLOCK_N
        block_n = min(LOOP_BLOCK_N, MAX_BLOCK_N, next_pow2(n)) if looped else next_pow2(n)
        rblock = max(1, min(next_pow2(rows), TILE // block_n))
        for out, o in zip(outs, p.outputs):
            strides += [out.stride(k) for k in o.dims]
        args += outs + ([rows] if p.rnumel_arg else []) + [shape[k] for k in p.dynamic] + strides
        self._kernel(looped)[(cdiv(rows, rblock),)](
            *args, RBLOCK=rblock, BLOCK_N=block_n, num_warps=4 if rblock * block_n <= 2048 else 8,
            **NO_FMA)
        self.last_variant = "looped" if looped else "persistent"
        return single_or_tuple(outs)
