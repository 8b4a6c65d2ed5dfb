"""Which FX nodes the Triton lowering can compute, normalized into `Op` records.

Dynamo spells one operation many ways (`operator.add`, `torch.add`, `x.add(...)`;
`torch._C._nn.gelu` and `F.gelu`; `x.to(torch.float16)` and `x.half()`). `classify` maps every
spelling to one `Op(kind, name, operands, params)` so the partitioner and the code generators
match on names, never on targets. Anything not recognized, or recognized with arguments the
generated code does not honour (a softmax over dim 0, `alpha=` on add, an integer tensor),
is `None` and stays eager.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from effc.compiler.graph_facts import node_value

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# pow exponents the generated code evaluates exactly as eager does (products, sqrt, rsqrt)
POW_EXPONENTS = (-2, -1, -0.5, 0.5, 1, 2, 3, 4)


@dataclasses.dataclass(frozen=True)
class Op:
    """A node the lowering understands.

    kind: "pointwise" (elementwise, output shape = broadcast of operands), "reduction"
    (over the last dim: keeps it as size 1, or, for softmax/norms, a row-wise op whose output
    has the input's shape) or "gemm" (a GEMM-like op with a Triton template: effc's
    `low_rank_linear`, or the dense `linear`, which the partitioner keeps only with an epilogue).
    operands: the values read, in the order the code generators expect (fx.Node, a Python
    number, or None for an absent optional tensor).
    """

    kind: str
    name: str
    operands: tuple[Any, ...]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def nodes(self) -> list[fx.Node]:
        return [a for a in self.operands if isinstance(a, fx.Node)]


_BINARY = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
           operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
           torch.true_divide: "div"}
_BINARY_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "true_divide": "div",
                   "__add__": "add", "__sub__": "sub", "__mul__": "mul", "__truediv__": "div",
                   "__radd__": "add", "__rmul__": "mul"}
_UNARY = {torch.relu: "relu", F.relu: "relu", torch.tanh: "tanh", F.tanh: "tanh",
          torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.exp: "exp", torch.log: "log",
          torch.rsqrt: "rsqrt", torch.sqrt: "sqrt", torch.neg: "neg", operator.neg: "neg",
          torch.abs: "abs", operator.abs: "abs", torch.cos: "cos", torch.sin: "sin",
          F.silu: "silu"}
_UNARY_METHODS = {"relu", "tanh", "sigmoid", "exp", "log", "rsqrt", "sqrt", "neg", "abs", "cos",
                  "sin"}
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}
_REDUCE = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax"}
_SOFTMAX = (torch.softmax, F.softmax)
_LAYER_NORM = (F.layer_norm, torch.layer_norm)
_GELU = (F.gelu, torch._C._nn.gelu)
_LINEAR = (torch._C._nn.linear, F.linear)  # one builtin today; both spellings kept on purpose
LIBRARY_GEMMS = ("linear",)  # a library call (cuBLAS) beats our template when nothing is fused


def _gemm_targets() -> dict[Any, str]:
    import effc.kernels.low_rank  # noqa: F401  (registers the op)

    op = torch.ops.effc.low_rank_linear
    return {op: "low_rank_linear", op.default: "low_rank_linear"}


def sym(size: Any) -> sympy.Expr:
    """A size (int or SymInt) as a sympy expression; symbolic sizes keep their symbols."""
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def meta(node: Any) -> tuple[tuple[sympy.Expr, ...], torch.dtype, torch.device] | None:
    """(shape as sympy, dtype, device) of a tensor-valued node, else None."""
    if not isinstance(node, fx.Node):
        return None
    val = node_value(node)
    if isinstance(val, torch.Tensor):
        return tuple(sym(s) for s in val.shape), val.dtype, val.device
    tm = node.meta.get("tensor_meta")  # torch.fx.passes.shape_prop.ShapeProp
    if tm is not None and hasattr(tm, "shape"):
        return tuple(sym(s) for s in tm.shape), tm.dtype, None
    return None


def _float_tensor(node: Any) -> bool:
    m = meta(node)
    return m is not None and m[1] in FLOAT_DTYPES


def _scalar(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _last_dim(dim: Any, ndim: int) -> bool:
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    return isinstance(dim, int) and not isinstance(dim, bool) and ndim > 0 and dim in (-1, ndim - 1)


def _only(node: fx.Node, allowed: set[str], first: int) -> bool:
    """True if the node passes nothing beyond `first` positional args and `allowed` kwargs."""
    return len(node.args) <= first and set(node.kwargs) <= allowed


def _pointwise(node: fx.Node) -> Op | None:
    t, args, kw = node.target, node.args, node.kwargs
    method = node.op == "call_method"
    name = (_BINARY_METHODS.get(t) if method else _BINARY.get(t))
    if name is not None:
        if len(args) != 2 or kw.get("alpha", 1) != 1 or kw.get("rounding_mode") is not None:
            return None
        if set(kw) - {"alpha", "rounding_mode"}:
            return None
        # `number / tensor` is Tensor.__rtruediv__: reciprocal(tensor) * number, rounded twice
        reciprocal = name == "div" and t is operator.truediv and not isinstance(args[0], fx.Node)
        return Op("pointwise", name, tuple(args), {"reciprocal": True} if reciprocal else {})
    if (method and t in _UNARY_METHODS) or (not method and t in _UNARY):
        # F.relu/F.silu take `inplace`; only the out-of-place form is pure
        if any(a is not False for a in args[1:]) or kw.get("inplace", False) or set(kw) - {"inplace"}:
            return None
        return Op("pointwise", t if method else _UNARY[t], (args[0],))
    if not method and t in _GELU or method and t == "gelu":
        approximate = _arg(node, 1, "approximate", "none")
        if approximate not in ("none", "tanh") or not _only(node, {"approximate"}, 2):
            return None
        return Op("pointwise", "gelu", (args[0],), {"approximate": approximate})
    if (not method and t in (torch.pow, operator.pow)) or (method and t == "pow"):
        exponent = _arg(node, 1, "exponent")
        if not _scalar(exponent) or exponent not in POW_EXPONENTS or not _only(node, {"exponent"}, 2):
            return None
        return Op("pointwise", "pow", (args[0],), {"exponent": exponent})
    if method and t == "to" or method and t in _CAST_METHODS:
        return _cast(node)
    if t is F.dropout:
        training = _arg(node, 2, "training", True)
        p = _arg(node, 1, "p", 0.5)
        if _arg(node, 3, "inplace", False) or (training and p != 0):
            return None
        return Op("pointwise", "identity", (args[0],))
    return None


def _cast(node: fx.Node) -> Op | None:
    """`.to(dtype)`, `.to(device=same, dtype=...)`, `.float()`/`.half()`/`.bfloat16()`."""
    if node.target in _CAST_METHODS:
        return Op("pointwise", "cast", (node.args[0],)) if _only(node, set(), 1) else None
    src, out = meta(node.args[0]), meta(node)
    if src is None or out is None:
        return None
    rest = list(node.args[1:])
    dtype = node.kwargs.get("dtype")
    device = node.kwargs.get("device")
    for a in rest:
        if isinstance(a, torch.dtype) and dtype is None:
            dtype = a
        elif isinstance(a, (torch.device, str)) and device is None:
            device = a
        else:
            return None
    if set(node.kwargs) - {"dtype", "device", "copy", "non_blocking"} or dtype is None:
        return None
    if device is not None and src[2] is not None and torch.device(device) != src[2]:
        return None
    return Op("pointwise", "cast", (node.args[0],))


def _reduction(node: fx.Node) -> Op | None:
    t, args = node.target, node.args
    method = node.op == "call_method"
    x = args[0] if args else None
    m = meta(x)
    if m is None or len(m[0]) == 0 or m[0][-1] == 1:
        return None
    ndim = len(m[0])
    if (not method and t in _REDUCE) or (method and t in ("mean", "sum", "amax")):
        name = t if method else _REDUCE[t]
        dim = _arg(node, 1, "dim")
        keepdim = _arg(node, 2, "keepdim", False)
        if not _last_dim(dim, ndim) or keepdim is not True or node.kwargs.get("dtype") is not None:
            return None
        if set(node.kwargs) - {"dim", "keepdim", "dtype"}:
            return None
        return Op("reduction", name, (x,))
    if (not method and t in _SOFTMAX) or (method and t == "softmax"):
        # a `dtype=` argument only casts the input; the kernel computes in fp32 and rounds
        # to the node's dtype either way
        if not _last_dim(_arg(node, 1, "dim"), ndim):
            return None
        return Op("reduction", "softmax", (x,))
    if not method and t in _LAYER_NORM:
        shape = _arg(node, 1, "normalized_shape")
        w, b, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
        if not _norm_args(shape, m, (w, b), eps):
            return None
        return Op("reduction", "layer_norm", (x, w, b), {"eps": float(eps)})
    if not method and t is getattr(F, "rms_norm", None):
        shape = _arg(node, 1, "normalized_shape")
        w, eps = _arg(node, 2, "weight"), _arg(node, 3, "eps")
        if eps is None:
            eps = torch.finfo(m[1]).eps
        if not _norm_args(shape, m, (w,), eps):
            return None
        return Op("reduction", "rms_norm", (x, w), {"eps": float(eps)})
    return None


def _norm_args(shape: Any, m: tuple, affine: tuple, eps: Any) -> bool:
    """Normalized over exactly the last dim, affine params absent or float tensors [N]."""
    if not isinstance(shape, (list, tuple)) or len(shape) != 1 or not _scalar(eps):
        return False
    size = node_value(shape[0]) if isinstance(shape[0], fx.Node) else shape[0]  # a SymInt input
    if not isinstance(size, (int, torch.SymInt)) or sym(size) != m[0][-1]:
        return False
    for p in affine:
        pm = meta(p) if p is not None else None
        if p is not None and (pm is None or pm[1] not in FLOAT_DTYPES or pm[0] != (m[0][-1],)):
            return False
    return True


def _linear(node: fx.Node) -> Op | None:
    """`F.linear(x, W, b)`: x [..., K], W [N, K], b [N] or None, all of one float dtype."""
    if not _only(node, {"bias"}, 3) or len(node.args) < 2:
        return None
    x, w = node.args[:2]
    bias = _arg(node, 2, "bias")
    xm, wm = meta(x), meta(w)
    if xm is None or wm is None or len(xm[0]) == 0 or len(wm[0]) != 2 or xm[1] != wm[1]:
        return None
    if bias is not None:
        bm = meta(bias)
        if bm is None or bm[1] != wm[1] or bm[0] != (wm[0][0],):
            return None
    return Op("gemm", "linear", (x, w, bias))


def _gemm(node: fx.Node) -> Op | None:
    if node.target in _LINEAR:
        return _linear(node)
    name = _gemm_targets().get(node.target)
    if name is None:
        return None
    x, v, u = node.args[:3]
    bias = _arg(node, 3, "bias")
    activation = _arg(node, 4, "activation", "none")
    vm = meta(v)
    if vm is None or len(vm[0]) != 2 or not vm[0][0].is_Integer:
        return None  # the template pads the rank to a compile-time block
    from effc.kernels.low_rank import ACTIVATIONS, MAX_FUSED_RANK

    if int(vm[0][0]) > MAX_FUSED_RANK or activation not in ACTIVATIONS:
        return None
    return Op("gemm", name, (x, v, u, bias), {"activation": activation})


def classify(node: fx.Node) -> Op | None:
    """The `Op` a node computes, or None if the Triton lowering leaves it to eager."""
    if node.op not in ("call_function", "call_method") or not _float_tensor(node):
        return None
    try:
        op = _gemm(node) if node.op == "call_function" else None
        op = op or _pointwise(node) or _reduction(node)
    except (TypeError, ValueError, IndexError):
        return None  # an argument pattern this table does not know
    if op is None:
        return None
    for a in op.operands:
        if isinstance(a, fx.Node):
            if not _float_tensor(a):
                return None
        elif a is not None and not _scalar(a):
            return None
    return op


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.setitem}


def mutates(node: fx.Node) -> bool:
    """True if the node writes into a tensor in place (the lowering then leaves the graph alone)."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return node.target in _INPLACE_OPERATORS  # and_, or_, not_ are pure
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")
