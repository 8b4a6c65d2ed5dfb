"""What every generator shares: tl expressions per op, sympy index math, layouts, text.

Values inside a kernel are fp32. A node whose dtype is fp16/bf16 has its value rounded to that
dtype right where eager would have materialized it, so a fused chain computes what eager
computes op by op (up to the last-bit differences of exp/erf/rsqrt implementations). bf16
rounding is done with integer ops because the Triton interpreter's fp32->bf16 cast truncates.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Sequence

import sympy
import torch
import torch.fx as fx
from sympy.printing.str import StrPrinter

from effc.compiler.graph_facts import node_value
from effc.compiler.lowering.ops import Op, meta, sym

TL_DTYPE = {torch.float32: "tl.float32", torch.float16: "tl.float16",
            torch.bfloat16: "tl.bfloat16"}

ROUND_BF16 = '''

@triton.jit
def round_to_bf16(x):
    """fp32 -> nearest-even bf16, kept in fp32 (the interpreter's cast would truncate)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
'''

HEADER = '''"""effc generated Triton kernel `{name}` ({kind}).

{summary}
"""
import triton
import triton.language as tl
'''


class CodegenError(Exception):
    """A group this generator cannot compute; the group stays eager with this reason."""


class FloorDiv(sympy.Function):
    """x // d on non-negative integers (index arithmetic)."""

    nargs = 2

    @classmethod
    def eval(cls, x, d):
        if d == 1:
            return x
        if x.is_Integer and d.is_Integer:
            return sympy.Integer(int(x) // int(d))
        return None


class Rem(sympy.Function):
    """x % m on non-negative integers."""

    nargs = 2

    @classmethod
    def eval(cls, x, m):
        if m == 1:
            return sympy.Integer(0)
        if x.is_Integer and m.is_Integer:
            return sympy.Integer(int(x) % int(m))
        return None


class _Printer(StrPrinter):
    def _atom(self, e) -> str:
        text = self._print(e)
        return text if e.is_Atom or isinstance(e, (FloorDiv, Rem)) else f"({text})"

    def _print_FloorDiv(self, e):
        return f"({self._atom(e.args[0])} // {self._atom(e.args[1])})"

    def _print_Rem(self, e):
        return f"({self._atom(e.args[0])} % {self._atom(e.args[1])})"


def texpr(e: sympy.Expr) -> str:
    """A sympy index expression as Triton source."""
    return _Printer().doprint(e)


def size_symbols(shape: Sequence[sympy.Expr], prefix: str = "ks") -> tuple[tuple, list[int]]:
    """Kernel-space shape: static dims stay ints, dynamic dim k becomes argument `ks<k>`.

    Returns (shape, indices of the dims passed at run time).
    """
    out, dynamic = [], []
    for k, s in enumerate(shape):
        if s.is_Integer:
            out.append(s)
        else:
            out.append(sympy.Symbol(f"{prefix}{k}", integer=True, positive=True))
            dynamic.append(k)
    return tuple(out), dynamic


def dim_indices(linear: sympy.Symbol, shape: Sequence[sympy.Expr]) -> list[sympy.Expr]:
    """Row-major decomposition of a linear index over `shape` (outermost dim needs no %)."""
    out = []
    for k, size in enumerate(shape):
        inner = sympy.Mul(*shape[k + 1:]) if k + 1 < len(shape) else sympy.Integer(1)
        idx = FloorDiv(linear, inner)
        out.append(sympy.Integer(0) if size == 1 else (idx if k == 0 else Rem(idx, size)))
    return out


def strides_of(node: fx.Node) -> tuple[sympy.Expr, ...] | None:
    val = node_value(node)
    if isinstance(val, torch.Tensor):
        return tuple(sym(s) for s in val.stride())
    tm = node.meta.get("tensor_meta")
    return tuple(sym(s) for s in tm.stride) if tm is not None else None


def memory_order(shape: Sequence[sympy.Expr], strides: Sequence[sympy.Expr]) -> list[int] | None:
    """Dims from outermost to innermost in memory if the layout is dense, else None.

    Guard-free under dynamic shapes: strides are matched to products of sizes symbolically.
    Row-major layouts give the identity; otherwise size-1 dims go first (their stride is
    meaningless).
    """
    pending = [k for k, s in enumerate(shape) if s != 1]
    inner_first, expected = [], sympy.Integer(1)
    while pending:
        k = next((k for k in reversed(pending) if sympy.expand(strides[k] - expected) == 0), None)
        if k is None:
            return None
        inner_first.append(k)
        pending.remove(k)
        expected = expected * shape[k]
    outer_first = inner_first[::-1]
    if outer_first == sorted(outer_first):
        return list(range(len(shape)))
    return [k for k, s in enumerate(shape) if s == 1] + outer_first


def row_major(shape: Sequence[sympy.Expr], strides: Sequence[sympy.Expr] | None) -> bool:
    """Row-major (contiguous) layout; True when unknown (inputs are made so at launch)."""
    if strides is None:
        return True
    order = memory_order(shape, strides)
    return order is not None and [k for k in order if shape[k] != 1] == [
        k for k in range(len(shape)) if shape[k] != 1]


def output_order(group_outputs: Sequence[fx.Node], shape: tuple) -> list[int]:
    """The common dense memory order of a group's outputs (what eager would have produced)."""
    orders = set()
    for n in group_outputs:
        m, st = meta(n), strides_of(n)
        if st is None:
            return list(range(len(shape)))
        order = memory_order(m[0], st)
        if order is None:
            raise CodegenError(f"output {n.name} has a non-dense layout (strides {st})")
        orders.add(tuple(order))
    if len(orders) > 1:
        raise CodegenError(f"outputs have different memory orders {sorted(orders)}")
    return list(orders.pop()) if orders else list(range(len(shape)))


def broadcast_dims(in_shape: Sequence[sympy.Expr], out_shape: Sequence[sympy.Expr]) -> list[bool]:
    """Per output dim: True if the input varies along it (False: broadcast, stride 0)."""
    lead = len(out_shape) - len(in_shape)
    if lead < 0:
        raise CodegenError(f"input of rank {len(in_shape)} in an output of rank {len(out_shape)}")
    varies = []
    for k, s in enumerate(out_shape):
        i = k - lead
        if i < 0 or in_shape[i] == 1:
            varies.append(False)
        elif in_shape[i] == s:
            varies.append(s != 1)
        else:
            raise CodegenError(f"input shape {tuple(in_shape)} does not broadcast to {tuple(out_shape)}")
    return varies


def scalar(x: float | int) -> str:
    return repr(float(x))


def _literal(value: str | float, dtype: torch.dtype) -> str:
    return value if isinstance(value, str) else scalar(torch.tensor(value, dtype=dtype).item())


# one-operand ops that are a single expression of their operand `{x}` (fp32)
_UNARY_EXPRESSIONS = {
    "relu": "tl.where({x} < 0, 0.0, {x})",  # keeps NaN, as torch.relu does
    "silu": "{x} * tl.sigmoid({x})", "neg": "-{x}", "sqrt": "tl.sqrt_rn({x})",
    "erf": "tl.math.erf({x})", "reciprocal": "1.0 / {x}", "square": "{x} * {x}",
    **{n: f"tl.{n}({{x}})" for n in ("sigmoid", "exp", "log", "rsqrt", "abs", "cos", "sin")},
}


def expr(op: Op, a: list[str | float], dtype: torch.dtype = torch.float32) -> str:
    """The fp32 value of a pointwise op whose result has `dtype`, given its operands
    (variable names, or Python numbers).

    Python numbers follow eager: add/sub convert them to the result dtype first (on the CPU;
    CUDA reads them in fp32: `number_in_fp32`), mul/div use them in fp32, and
    `number / tensor` in Python is `reciprocal(tensor) * number`.
    """
    n = op.name
    binary = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
    if n in binary:
        to_dtype = n in ("add", "sub") and not op.params.get("number_in_fp32")
        x, y = (_literal(v, dtype if to_dtype else torch.float32) for v in a)
        if op.params.get("reciprocal"):
            return f"{rounded(f'(1.0 / {y})', dtype)} * {x}"
        return f"{x} {binary[n]} {y}"
    x = _literal(a[0], torch.float32)
    if n in ("identity", "cast"):
        return x
    if n in _UNARY_EXPRESSIONS:
        return _UNARY_EXPRESSIONS[n].format(x=x)
    if n == "gelu" and op.params.get("approximate") == "tanh":
        # 0.5 * (1 + tanh(z)) == sigmoid(2z)
        return f"{x} * tl.sigmoid(1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x}))"
    if n == "gelu":
        return f"0.5 * {x} * (1.0 + tl.math.erf({x} * 0.7071067811865476))"
    if n == "tanh":
        # 2 sigmoid(2x) - 1 loses relative precision near 0, where the odd Taylor series
        # (to x^11, error < 1e-9 relative for |x| < 0.3) takes over
        series = (f"{x} * (1.0 + {x} * {x} * (-0.3333333333333333 + {x} * {x} * (0.13333333333333333"
                  f" + {x} * {x} * (-0.05396825396825397 + {x} * {x} * (0.021869488536155203"
                  f" + {x} * {x} * -0.008863235529902197)))))")
        return f"tl.where(tl.abs({x}) < 0.3, {series}, 2.0 * tl.sigmoid(2.0 * {x}) - 1.0)"
    if n == "clamp":  # NaN stays NaN, as in torch; min > max gives max, as in torch
        lo, hi = op.params["min"], op.params["max"]
        value = x if lo is None else f"tl.where({x} < {float(lo)!r}, {float(lo)!r}, {x})"
        return value if hi is None else f"tl.where({value} > {float(hi)!r}, {float(hi)!r}, {value})"
    if n == "leaky_relu":
        return f"tl.where({x} > 0, {x}, {x} * {float(op.params['negative_slope'])!r})"
    if n in ("hardswish", "hardsigmoid"):  # x * relu6(x + 3) / 6 and relu6(x + 3) / 6
        relu6 = f"tl.where({x} + 3.0 < 0.0, 0.0, tl.where({x} + 3.0 > 6.0, 6.0, {x} + 3.0))"
        return f"{x} * {relu6} / 6.0" if n == "hardswish" else f"{relu6} / 6.0"
    if n == "pow":
        e = op.params["exponent"]
        if e == 0.5:
            return f"tl.sqrt_rn({x})"
        if e == -0.5:
            return f"tl.rsqrt({x})"
        prod = " * ".join([x] * int(abs(e)))
        return prod if e > 0 else f"1.0 / ({prod})"
    raise CodegenError(f"no Triton expression for {n}")


def rounded(value: str, dtype: torch.dtype) -> str:
    """`value` rounded to `dtype` and kept in fp32."""
    if dtype == torch.float16:
        return f"{value}.to(tl.float16).to(tl.float32)"
    if dtype == torch.bfloat16:
        return f"round_to_bf16({value})"
    return value


def assign(var: str, value: str, dtype: torch.dtype) -> list[str]:
    """`var = value`, rounded to `dtype` where eager would store it (fp32 needs nothing)."""
    if dtype == torch.float32:
        return [f"{var} = {value}"]
    return [f"{var} = {value}", f"{var} = {rounded(var, dtype)}"]


def operand(a, names: dict) -> str | float:
    """A node's variable name, or the Python number itself (`expr` formats it)."""
    return names[a] if isinstance(a, fx.Node) else a


@dataclasses.dataclass
class Source:
    """A generated kernel: module text, the jit function's name, and how to launch it."""

    name: str
    kind: str
    text: str
    plan: object  # the kind's launch plan (see each generator)


def jit_def(name: str, params: list[str], lines: list[str]) -> str:
    """`@triton.jit def name(params):` with the body `lines`, parameters wrapped at 96 columns."""
    head, rows, row = f"def {name}(", [], ""
    for p in params:
        if row and len(head) + len(row) + len(p) + 2 > 96:
            rows.append(row.rstrip())
            row = ""
        row += p + ", "
    rows.append(row.rstrip(", "))
    signature = head + ("\n" + " " * len(head)).join(rows) + "):\n"
    return "@triton.jit\n" + signature + "".join(f"    {line}\n" for line in lines)


def module_text(name: str, kind: str, summary: str, body: str, needs_bf16: bool) -> str:
    summary = textwrap.fill(summary, 96, break_on_hyphens=False)
    return (HEADER.format(name=name, kind=kind, summary=summary)
            + (ROUND_BF16 if needs_bf16 else "") + "\n\n" + body.strip("\n") + "\n")


def describe(node: fx.Node) -> str:
    """`add_1 = add(mul, 1e-06)`: what a node computes, for a comment above its line."""
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__",
                                                                      str(node.target))
    args = [a.name if isinstance(a, fx.Node) else repr(a) for a in node.args]
    args += [f"{k}={v.name if isinstance(v, fx.Node) else repr(v)}" for k, v in node.kwargs.items()]
    text = f"{node.name} = {target}({', '.join(args)})"
    return text if len(text) <= 96 else text[:93] + "..."


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 2 ** math.ceil(math.log2(n))
