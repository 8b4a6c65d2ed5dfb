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
import functools
import math
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from effc.compiler.graph_facts import ROWS_VARY, node_arg, node_value

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# pow exponents the generated code evaluates exactly as eager does (products, sqrt, rsqrt)
POW_EXPONENTS = (-2, -1, -0.5, 0.5, 1, 2, 3, 4)


@dataclasses.dataclass(frozen=True)
class Op:
    """A node the lowering understands.

    kind: "pointwise" (elementwise, output shape = broadcast of operands; or `cat`, whose
    output element is one operand's element at a shifted index), "reduction"
    (over the last dim: keeps it as size 1, or, for softmax/norms, a row-wise op whose output
    has the input's shape) or "gemm" (a GEMM-like op with a Triton template: effc's
    `low_rank_linear`, `phm_linear` and `shift_linear`, or the dense `linear`, which the
    partitioner keeps only with an epilogue).
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
          F.silu: "silu", torch.erf: "erf", torch.reciprocal: "reciprocal",
          torch.square: "square"}
_UNARY_METHODS = {"relu", "tanh", "sigmoid", "exp", "log", "rsqrt", "sqrt", "neg", "abs", "cos",
                  "sin", "erf", "reciprocal", "square"}
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}
_REDUCE = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax"}
_SOFTMAX = (torch.softmax, F.softmax)
_LAYER_NORM = (F.layer_norm, torch.layer_norm)
_GELU = (F.gelu, torch._C._nn.gelu)
_CAT = (torch.cat, torch.concat)
_MATMUL = (torch.matmul, operator.matmul)
_LINEAR = (torch._C._nn.linear, F.linear)  # one builtin today; both spellings kept on purpose
LIBRARY_GEMMS = ("linear",)  # a library call (cuBLAS) beats our template when nothing is fused


def _gemm_targets() -> dict[Any, str]:
    import effc.kernels.low_rank  # noqa: F401  (registers the ops)
    import effc.kernels.phm  # noqa: F401
    import effc.kernels.shift  # noqa: F401

    targets = {}
    for name in ("low_rank_linear", "phm_linear", "shift_linear"):
        op = getattr(torch.ops.effc, name)
        targets.update({op: name, op.default: name})
    return targets


def _exact_quotient(e: sympy.Expr) -> sympy.Expr:
    """FloorDiv(a, b) -> a / b when b divides a as polynomials ((s // 4)**2 // (s // 4))."""
    a, b = e.args
    q = sympy.cancel(a / b)
    return q if sympy.fraction(q)[1] == 1 else e


def sym(size: Any) -> sympy.Expr:
    """A size or stride (int or SymInt) as a sympy expression; symbolic sizes keep their
    symbols. Two spellings torch's shape algebra leaves unsimplified are normalised, so equal
    sizes compare equal: `Max(1, x)` in a contiguous tensor's strides (x differs from it only
    when some size is 0, and then no element is read) and an exact floor division."""
    if not isinstance(size, torch.SymInt):
        return sympy.Integer(int(size))
    return _normalized(sympy.sympify(size.node.expr))


@functools.lru_cache(maxsize=4096)
def _normalized(e: sympy.Expr) -> sympy.Expr:
    """sym()'s rewrites, once per distinct expression (a graph repeats the same few sizes)."""
    e = e.replace(lambda x: type(x).__name__ == "Max" and len(x.args) == 2 and 1 in x.args,
                  lambda x: x.args[0] if x.args[1] == 1 else x.args[1])  # torch's own Max too
    return e.replace(lambda x: type(x).__name__ == "FloorDiv" and len(x.args) == 2,
                     _exact_quotient)


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


def cuda_reciprocal(divisor: float) -> float:
    """What CUDA eager multiplies by for `tensor / number`: the fp32 reciprocal of the number
    (torch's div_true_kernel_cuda; the CPU kernel divides). The result can differ from a true
    division in the last bit, which a cancellation downstream makes visible."""
    one, d = torch.tensor(1.0), torch.tensor(float(divisor), dtype=torch.float32)
    return (one / d).item()


def _last_dim(dim: Any, ndim: int) -> bool:
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    return isinstance(dim, int) and not isinstance(dim, bool) and ndim > 0 and dim in (-1, ndim - 1)


def _only(node: fx.Node, allowed: set[str], first: int) -> bool:
    """True if the node passes nothing beyond `first` positional args and `allowed` kwargs."""
    return len(node.args) <= first and set(node.kwargs) <= allowed


# ops with Python-number parameters: name -> (parameter names and defaults, after the input)
_PARAM_FUNCTIONS = {
    torch.clamp: ("clamp", ("min", None), ("max", None)), torch.clip: ("clamp", ("min", None), ("max", None)),
    torch.clamp_min: ("clamp", ("min", None)), torch.clamp_max: ("clamp", ("max", None)),
    F.hardtanh: ("clamp", ("min_val", -1.0), ("max_val", 1.0), ("inplace", False)),
    F.relu6: ("relu6", ("inplace", False)),
    F.leaky_relu: ("leaky_relu", ("negative_slope", 0.01), ("inplace", False)),
    F.hardswish: ("hardswish", ("inplace", False)),
    F.hardsigmoid: ("hardsigmoid", ("inplace", False)),
}
_PARAM_METHODS = {"clamp": _PARAM_FUNCTIONS[torch.clamp], "clip": _PARAM_FUNCTIONS[torch.clamp],
                  "clamp_min": _PARAM_FUNCTIONS[torch.clamp_min],
                  "clamp_max": _PARAM_FUNCTIONS[torch.clamp_max]}


def _with_params(node: fx.Node, spec: tuple) -> Op | None:
    """An op whose parameters are Python numbers (clamp bounds, a slope), `inplace` False."""
    name, params = spec[0], dict(spec[1:])
    names = list(params)
    if len(node.args) > 1 + len(names) or set(node.kwargs) - set(names):
        return None
    values = {k: node_arg(node, i + 1, k, params[k]) for i, k in enumerate(names)}
    if values.pop("inplace", False) is not False:
        return None
    if not all(v is None or _scalar(v) for v in values.values()):
        return None  # a tensor bound, or a NaN/inf one
    if name == "relu6":
        name, values = "clamp", {"min": 0.0, "max": 6.0}
    if name == "clamp":
        lo, hi = (values.get(k) for k in (("min", "max") if "min" in values or "max" in values
                                           else ("min_val", "max_val")))
        if lo is None and hi is None:
            return None  # torch refuses a clamp without bounds
        values = {"min": lo, "max": hi}
    return Op("pointwise", name, (node.args[0],), values)


def _pointwise(node: fx.Node) -> Op | None:
    t, args, kw = node.target, node.args, node.kwargs
    method = node.op == "call_method"
    spec = _PARAM_METHODS.get(t) if method else _PARAM_FUNCTIONS.get(t)
    if spec is not None:
        return _with_params(node, spec)
    name = (_BINARY_METHODS.get(t) if method else _BINARY.get(t))
    if name is not None:
        if len(args) != 2 or kw.get("alpha", 1) != 1 or kw.get("rounding_mode") is not None:
            return None
        if set(kw) - {"alpha", "rounding_mode"}:
            return None
        # `number / tensor` is Tensor.__rtruediv__: reciprocal(tensor) * number, rounded twice
        reciprocal = name == "div" and t is operator.truediv and not isinstance(args[0], fx.Node)
        if meta(node) is not None and meta(node)[1] == torch.float32:  # a number, exactly
            args = tuple(scalar_tensor_of(a) or a for a in args)  # (Llama's `var + eps`)
        # CUDA eager reads a Python number in fp32 where the CPU rounds it to the dtype first
        # (add, sub), and multiplies by its fp32 reciprocal where the CPU divides
        m = meta(node)
        cuda = m is not None and m[2] is not None and m[2].type == "cuda"
        if cuda and name == "div" and not reciprocal and _scalar(args[1]):
            return Op("pointwise", "mul", (args[0], cuda_reciprocal(args[1])))
        params = {"reciprocal": True} if reciprocal else {}
        if cuda and name in ("add", "sub"):
            params["number_in_fp32"] = True
        return Op("pointwise", name, tuple(args), params)
    if (method and t in _UNARY_METHODS) or (not method and t in _UNARY):
        # F.relu/F.silu take `inplace`; only the out-of-place form is pure
        if any(a is not False for a in args[1:]) or kw.get("inplace", False) or set(kw) - {"inplace"}:
            return None
        return Op("pointwise", t if method else _UNARY[t], (args[0],))
    if not method and t in _GELU or method and t == "gelu":
        approximate = node_arg(node, 1, "approximate", "none")
        if approximate not in ("none", "tanh") or not _only(node, {"approximate"}, 2):
            return None
        return Op("pointwise", "gelu", (args[0],), {"approximate": approximate})
    if (not method and t in (torch.pow, operator.pow)) or (method and t == "pow"):
        exponent = node_arg(node, 1, "exponent")
        if not _scalar(exponent) or exponent not in POW_EXPONENTS or not _only(node, {"exponent"}, 2):
            return None
        return Op("pointwise", "pow", (args[0],), {"exponent": exponent})
    if method and t == "to" or method and t in _CAST_METHODS:
        return _cast(node)
    if method and t == "type_as":  # Gemma's norms: `out.type_as(x)`, a cast to x's dtype
        return Op("pointwise", "cast", (args[0],)) if _only(node, set(), 2) else None
    if t is F.dropout:
        training = node_arg(node, 2, "training", True)
        p = node_arg(node, 1, "p", 0.5)
        if node_arg(node, 3, "inplace", False) or (training and p != 0):
            return None
        return Op("pointwise", "identity", (args[0],))
    return None


def _cat(node: fx.Node) -> Op | None:
    """`torch.cat(tensors, dim)` of tensors of the output's dtype and rank (no legacy empty
    1-d operand: the lowering drops those first), each with a static size >= 1 along `dim`: the
    kernel picks the operand an output element comes from by comparing its index with these
    sizes, baked in as constants. One operand is a copy. params: `dim` (non-negative) and the
    operands' `sizes` along it."""
    tensors, dim = node_arg(node, 0, "tensors"), node_arg(node, 1, "dim", 0)
    if not _only(node, {"tensors", "dim"}, 2) or not isinstance(tensors, (list, tuple)):
        return None
    out = meta(node)
    if not tensors or out is None or not isinstance(dim, int) or isinstance(dim, bool):
        return None
    ndim = len(out[0])
    if not -ndim <= dim < ndim:
        return None
    dim %= ndim
    sizes = []
    for t in tensors:
        m = meta(t)
        if m is None or m[1] != out[1] or len(m[0]) != ndim:
            return None
        if any(s != o for k, (s, o) in enumerate(zip(m[0], out[0])) if k != dim):
            return None
        if not m[0][dim].is_Integer or int(m[0][dim]) < 1:
            return None
        sizes.append(int(m[0][dim]))
    return Op("pointwise", "cat", tuple(tensors), {"dim": dim, "sizes": sizes})


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
        dim = node_arg(node, 1, "dim")
        keepdim = node_arg(node, 2, "keepdim", False)
        if not _last_dim(dim, ndim) or keepdim is not True or node.kwargs.get("dtype") is not None:
            return None
        if set(node.kwargs) - {"dim", "keepdim", "dtype"}:
            return None
        return Op("reduction", name, (x,))
    if (not method and t in _SOFTMAX) or (method and t == "softmax"):
        # a `dtype=` argument only casts the input; the kernel computes in fp32 and rounds
        # to the node's dtype either way
        if not _last_dim(node_arg(node, 1, "dim"), ndim):
            return None
        return Op("reduction", "softmax", (x,))
    if not method and t in _LAYER_NORM:
        shape = node_arg(node, 1, "normalized_shape")
        w, b = node_arg(node, 2, "weight"), node_arg(node, 3, "bias")
        eps = node_arg(node, 4, "eps", 1e-5)
        if not _norm_args(shape, m, (w, b), eps):
            return None
        return Op("reduction", "layer_norm", *_eps(eps, (x, w, b)))
    if not method and t is getattr(F, "rms_norm", None):
        shape = node_arg(node, 1, "normalized_shape")
        w, eps = node_arg(node, 2, "weight"), node_arg(node, 3, "eps")
        if eps is None:
            eps = torch.finfo(m[1]).eps
        if not _norm_args(shape, m, (w,), eps):
            return None
        return Op("reduction", "rms_norm", *_eps(eps, (x, w)))
    return None


def scalar_tensor_of(a: Any) -> fx.Node | None:
    """t if `a` is `t.item()` of a 0-dim float tensor t, else None. Under dynamic=True Dynamo
    passes a module's float attribute (a norm's eps) that way: kernels read t as a broadcast
    scalar instead, so the op still fuses."""
    if isinstance(a, fx.Node) and a.op == "call_method" and a.target == "item" and \
            len(a.args) == 1 and not a.kwargs:
        m = meta(a.args[0])
        if m is not None and m[0] == () and m[1] in FLOAT_DTYPES + (torch.float64,):
            return a.args[0]
    return None


def _eps(value: Any, operands: tuple) -> tuple[tuple, dict] | None:
    """(operands, params) of a norm with epsilon `value`: a number in params, or a scalar
    tensor (see scalar_tensor_of) as the last operand."""
    if _scalar(value):
        return operands, {"eps": float(value)}
    t = scalar_tensor_of(value)
    return (operands + (t,), {"eps": None, "eps_at": len(operands)}) if t is not None else None


def _norm_args(shape: Any, m: tuple, affine: tuple, eps: Any) -> bool:
    """Normalized over exactly the last dim, affine params absent or float tensors [N]."""
    if not isinstance(shape, (list, tuple)) or len(shape) != 1 or (
            not _scalar(eps) and scalar_tensor_of(eps) is None):
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
    bias = node_arg(node, 2, "bias")
    xm, wm = meta(x), meta(w)
    if xm is None or wm is None or len(xm[0]) == 0 or len(wm[0]) != 2 or xm[1] != wm[1]:
        return None
    if bias is not None:
        bm = meta(bias)
        if bm is None or bm[1] != wm[1] or bm[0] != (wm[0][0],):
            return None
    return Op("gemm", "linear", (x, w, bias))


def _matmul(node: fx.Node) -> Op | None:
    """`x @ B` with a 2-D B [K, N] (Falcon's `x @ W.T`; a weight stored [in, out]): the dense
    linear with weight B^T, which the template reads through B's strides."""
    if node.kwargs or len(node.args) != 2:
        return None
    x, b = node.args
    xm, bm = meta(x), meta(b)
    if xm is None or bm is None or len(xm[0]) < 2 or len(bm[0]) != 2 or xm[1] != bm[1]:
        return None
    return Op("gemm", "linear", (x, b, None), {"weight": "kn"})


def _phm_linear(node: fx.Node) -> Op | None:
    """`effc.phm_linear(x, a, s, bias)`: x [..., n q], a [T, n, n], s [T, p, q], bias [n p] or
    None, all of one float dtype (the op's fake implementation checked the shapes when it was
    traced). The template takes n, p, q and T at run time."""
    if not _only(node, {"bias"}, 4) or len(node.args) < 3:
        return None
    x, a, s = node.args[:3]
    bias = node_arg(node, 3, "bias")
    ms = [meta(t) for t in (x, a, s, bias) if t is not None]
    if any(m is None for m in ms) or len({m[1] for m in ms}) != 1:
        return None
    if len(ms[0][0]) == 0 or len(ms[1][0]) != 3 or len(ms[2][0]) != 3:
        return None
    return Op("gemm", "phm_linear", (x, a, s, bias))


def _shift_linear(node: fx.Node) -> Op | None:
    """`effc.shift_linear(x, codes, scale, bias, group)`: x [..., n] and bias [m] or None of one
    float dtype, codes uint8 [T, m, ceil(n / 2)] (the one operand that is not a float tensor:
    classify lets it through), scale [m, G] of a float dtype, `group` a Python int (0: one
    scale per row) kept in params (the op's fake implementation checked the shapes when it was
    traced). The template takes m, n, T and G at run time."""
    if not _only(node, {"bias", "group"}, 5) or len(node.args) < 3:
        return None
    x, codes, scale = node.args[:3]
    bias = node_arg(node, 3, "bias")
    group = node_arg(node, 4, "group", 0)
    if not isinstance(group, int) or isinstance(group, bool) or group < 0:
        return None
    xm, cm, sm = meta(x), meta(codes), meta(scale)
    bm = meta(bias) if bias is not None else None
    if xm is None or cm is None or sm is None or (bias is not None and bm is None):
        return None
    if len(xm[0]) == 0 or xm[1] not in FLOAT_DTYPES or cm[1] != torch.uint8 or \
            len(cm[0]) != 3 or len(sm[0]) != 2 or sm[1] not in FLOAT_DTYPES or \
            (bm is not None and bm[1] != xm[1]):
        return None
    return Op("gemm", "shift_linear", (x, codes, scale, bias), {"group": group})


def _gemm(node: fx.Node) -> Op | None:
    if node.target in _LINEAR:
        return _linear(node)
    if node.target in _MATMUL:
        return _matmul(node)
    name = _gemm_targets().get(node.target)
    if name is None:
        return None
    if name == "phm_linear":
        return _phm_linear(node)
    if name == "shift_linear":
        return _shift_linear(node)
    x, v, u = node.args[:3]
    bias = node_arg(node, 3, "bias")
    activation = node_arg(node, 4, "activation", "none")
    vm = meta(v)
    if vm is None or len(vm[0]) != 2 or not vm[0][0].is_Integer:
        return None  # the template pads the rank to a compile-time block
    from effc.kernels.low_rank import ACTIVATIONS, MAX_FUSED_RANK

    if int(vm[0][0]) > MAX_FUSED_RANK or activation not in ACTIVATIONS:
        return None
    return Op("gemm", name, (x, v, u, bias), {"activation": activation})


def classify(node: fx.Node) -> Op | None:
    """The `Op` a node computes, or None if the Triton lowering leaves it to eager."""
    if node.op not in ("call_function", "call_method") or not _float_tensor(node) or \
            node.meta.get(ROWS_VARY):  # its shape metadata is not its shape at run time
        return None
    try:
        op = _gemm(node) if node.op == "call_function" else None
        if node.op == "call_function" and node.target in _CAT:
            op = _cat(node)
        op = op or _pointwise(node) or _reduction(node)
    except (TypeError, ValueError, IndexError):
        return None  # an argument pattern this table does not know
    if op is None:
        return None
    for a in op.operands:
        if op.name == "shift_linear" and a is op.operands[1]:
            continue  # the packed uint8 codes, checked by _shift_linear
        if isinstance(a, fx.Node):
            if not _float_tensor(a) and not (meta(a) is not None and meta(a)[0] == ()
                                             and meta(a)[1] == torch.float64):
                return None  # (a 0-dim float64 tensor is a number from `.item()`)
        elif a is not None and not _scalar(a):
            return None
    return op


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
                      operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.setitem, operator.delitem}
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                    "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__",
                    "__ilshift__", "__irshift__", "__setitem__", "__delitem__"}
# functions taking `inplace`, and its position (F.relu(x, True) is positional)
_INPLACE_FLAG = {F.relu: 1, F.silu: 1, F.relu6: 1, F.hardswish: 1, F.hardsigmoid: 1,
                 F.hardtanh: 3, F.leaky_relu: 2, F.elu: 2, F.dropout: 3}


def _inplace_flag(node: fx.Node) -> bool:
    pos = _INPLACE_FLAG.get(node.target) if node.op == "call_function" else None
    if pos is not None and len(node.args) > pos:
        return node.args[pos] is True
    return node.kwargs.get("inplace") is True


def mutates(node: fx.Node) -> bool:
    """True if the node writes into a tensor in place (the partitioner makes it a barrier,
    unless `out_of_place` applies)."""
    if node.op == "call_module":  # a leaf module in a hand-traced graph: nn.ReLU(inplace=True)
        owner = node.graph.owning_module
        try:
            module = owner.get_submodule(node.target) if owner is not None else None
        except AttributeError:
            return False
        return getattr(module, "inplace", False) is True
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target is F.dropout and node_arg(node, 2, "training", True) is False:
        return False  # eval-mode dropout returns its input untouched, inplace or not
    if _inplace_flag(node) or node.kwargs.get("out") is not None:
        return True
    if node.op == "call_method":
        return node.target in _INPLACE_DUNDERS or (node.target.endswith("_")
                                                   and not node.target.startswith("_"))
    if node.target in (F.batch_norm, torch.batch_norm):  # training updates the running stats
        first = 1 if node.target is F.batch_norm else 3
        stats = [node_arg(node, first, "running_mean"), node_arg(node, first + 1, "running_var")]
        return (node_arg(node, 5, "training", False) is not False
                and any(s is not None for s in stats))
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return node.target in _INPLACE_OPERATORS  # and_, or_, not_ are pure
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


# --- in-place ops with an out-of-place twin, and ops whose result is always a new tensor -----
_INPLACE_METHODS = {f"{name}_": name for name in
                    ("add", "sub", "mul", "div", "true_divide", "relu", "sigmoid", "tanh", "exp",
                     "log", "neg", "abs", "sqrt", "rsqrt", "cos", "sin", "pow", "clamp",
                     "clamp_min", "clamp_max", "masked_fill")}
_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv,
                      **{getattr(torch, f"{n}_"): getattr(torch, n) for n in
                         ("relu", "sigmoid", "tanh", "exp", "log", "neg", "abs", "sqrt", "rsqrt",
                          "cos", "sin")}}
# F.dropout is left out: with training=False its out-of-place form returns its input itself
_OUT_OF_PLACE_FLAG = {f: pos for f, pos in _INPLACE_FLAG.items() if f is not F.dropout}

_FRESH_FUNCTIONS = {
    torch.conv1d, torch.conv2d, torch.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.batch_norm, torch.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.linear,
    torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.embedding, torch.cat, torch.stack,
    torch.where, torch.masked_fill, torch.clamp, torch.clone, torch.cumsum, torch.softmax,
    F.softmax, F.log_softmax, F.gelu, torch.mean, torch.sum, torch.amax,
    operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
    torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne,
    *_INPLACE_FUNCTIONS.values(), *_OUT_OF_PLACE_FLAG,
} - {F.dropout}
_FRESH_METHODS = {"clone", "cumsum", "sum", "mean", "amax", "softmax", "matmul", "gt", "lt", "ge",
                  "le", "eq", "ne", *_INPLACE_METHODS.values()}


# ops returning a tuple of new tensors (values and indices): each item is fresh
_FRESH_TUPLE_FUNCTIONS = {torch.topk, torch.sort}
_FRESH_TUPLE_METHODS = {"topk", "sort"}


def _returns_fresh_tuple(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _FRESH_TUPLE_METHODS and not node.kwargs.get("out")
    return node.op == "call_function" and node.target in _FRESH_TUPLE_FUNCTIONS and \
        not node.kwargs.get("out")


def returns_fresh(node: fx.Node) -> bool:
    """True if the node's value is a new tensor, never a view of (or the same object as) an
    input: known compute ops only. Casts, dropout and views may hand back their input."""
    if node.op not in ("call_function", "call_method") or mutates(node):
        return False
    shape_prop = node.meta.get("tensor_meta")  # a tuple of them for a tuple value
    if not isinstance(node_value(node), torch.Tensor) and not hasattr(shape_prop, "shape"):
        return False
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    if node.target in _FRESH_FUNCTIONS:
        return True
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return _returns_fresh_tuple(node.args[0])  # topk's values: a new tensor
    op = classify(node)
    return op is not None and op.name not in ("identity", "cast")


def out_of_place(node: fx.Node) -> tuple[Any, tuple, dict] | None:
    """(target, args, kwargs) of the out-of-place twin of an in-place node that writes only
    into its first argument (`x.add_(y)` -> `x.add(y)`, `x += y` -> `x + y`,
    `F.relu(x, inplace=True)` -> `F.relu(x, inplace=False)`), else None."""
    if node.kwargs.get("out") is not None or not node.args:
        return None
    args, kwargs = node.args, dict(node.kwargs)
    if node.op == "call_method":
        target = _INPLACE_METHODS.get(node.target)
    elif node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
        target = _INPLACE_FUNCTIONS[node.target]
    elif node.op == "call_function" and node.target in _OUT_OF_PLACE_FLAG and _inplace_flag(node):
        target, pos = node.target, _OUT_OF_PLACE_FLAG[node.target]
        if len(args) > pos:
            args = args[:pos] + (False,) + args[pos + 1:]
        else:
            kwargs["inplace"] = False
    else:
        return None
    return (target, args, kwargs) if target is not None else None
