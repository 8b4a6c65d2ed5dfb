"""Rewrites the Triton lowering makes to its own copy of the graph before partitioning, so that
more of it fuses. Each keeps every value the graph computes; the report notes what was done.

Un-flattened GEMMs. Hugging Face's `Conv1D` (GPT-2 and its family) computes a linear layer
on a flattened input:

    x2 = x.view(-1, K);  y = torch.addmm(b, x2, W);  z = y.view(*x.shape[:-1], N)

and its activation or residual add reads `z`. A GEMM epilogue is computed on the GEMM's output
tile; the view between them has another shape, so the partitioner could not fuse across it.
Both views only relabel the leading dims of row-major data, so the same values are

    z = torch.matmul(x, W) + b        (effc.low_rank_linear(x, v, u, b) for a low-rank site)

which the partitioner sees as a GEMM on `x` with a bias epilogue. The dense rewrite is made only
when a pointwise op reads `z`: a GEMM with nothing to fuse stays the library's `addmm`
(cuBLAS beats a Triton template there). The low-rank one is always made: it is the same op;
so are `effc.phm_linear(x2, a, s, b)` and `effc.shift_linear(x2, codes, scale, b, group)`, the
hypercomplex and shift_add passes' rewrites of such a site.

Empty cat operands. `torch.cat` skips a legacy empty 1-d operand (`torch.tensor([])`, shape
(0,)) whatever the other operands' rank; Hugging Face's KV cache starts as one, so the first
`cat([cache, k], dim=-2)` of a prefill is a copy of k. Dropping such operands lets the cat
fuse with the ops that produce k (the rotary embedding), which then write the cache directly.
Only where the operands left all have the result's dtype: whether an empty operand takes
part in type promotion varies (measured: a float64 one does, a float32 one next to float16
does not), so the result's dtype must not depend on it.
"""

from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
import torch.fx as fx

from effc.compiler.graph_facts import copy_node_meta
from effc.compiler.lowering.ops import classify, meta

LOW_RANK = "low_rank_linear"
EFFC_GEMMS = (LOW_RANK, "phm_linear", "shift_linear")  # effc ops: any leading dims, the op on x
_VIEW_METHODS = ("view", "reshape")


def _is_view(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target in _VIEW_METHODS)
        or (node.op == "call_function" and node.target is torch.reshape))


def _flattened_input(x2: Any) -> fx.Node | None:
    """x if `x2` is `x.view(-1, K)` of an x with 2+ dims and the same last dim, else None."""
    if not _is_view(x2):
        return None
    x = x2.args[0]
    xm, x2m = meta(x), meta(x2)
    if xm is None or x2m is None or len(xm[0]) < 2 or len(x2m[0]) != 2:
        return None
    same = sympy.expand(x2m[0][1] - xm[0][-1]) == 0 and sympy.expand(
        x2m[0][0] - sympy.Mul(*xm[0][:-1])) == 0
    return x if same else None


def _gemm_of(y: fx.Node) -> tuple[str, fx.Node] | None:
    """("addmm" | an EFFC_GEMMS name, its flattened input node x2) if `y` is such a GEMM."""
    if y.op != "call_function":
        return None
    if y.target is torch.addmm and len(y.args) == 3 and not y.kwargs:
        return "addmm", y.args[1]
    op = classify(y)
    if op is not None and op.kind == "gemm" and op.name in EFFC_GEMMS:
        return op.name, y.args[0]
    return None


def unflatten_gemms(graph: fx.Graph) -> list[str]:
    """Rewrite every `view(gemm(x.view(-1, K)), x.shape[:-1] + (N,))` in `graph` as a GEMM on
    `x` (see the module docstring); the names of the views rewritten."""
    done = []
    for z in list(graph.nodes):
        if not _is_view(z) or not isinstance(z.args[0], fx.Node):
            continue
        y = z.args[0]
        found = _gemm_of(y)
        if found is None or len(y.users) != 1:
            continue
        kind, x2 = found
        x = _flattened_input(x2)
        zm, xm = meta(z), meta(x)
        if x is None or zm is None or tuple(zm[0][:-1]) != tuple(xm[0][:-1]):
            continue
        if kind == "addmm":
            b, _, w = y.args
            if not any((op := classify(u)) is not None and op.kind == "pointwise"
                       for u in z.users):
                continue  # nothing to fuse: the library's addmm is the better GEMM
            with graph.inserting_before(z):
                mm = graph.call_function(torch.matmul, (x, w))
                new = graph.call_function(operator.add, (mm, b))
            copy_node_meta(mm, z)
        else:
            with graph.inserting_before(z):
                new = graph.call_function(y.target, (x, *y.args[1:]), dict(y.kwargs))
        copy_node_meta(new, z)
        z.replace_all_uses_with(new)
        graph.erase_node(z)
        graph.erase_node(y)
        if not x2.users:
            graph.erase_node(x2)
        done.append(z.name)
    return done


def drop_empty_cat_operands(graph: fx.Graph) -> list[str]:
    """Drop legacy empty (shape (0,)) operands from every `cat` of `graph` whose other operands
    all have the result's dtype; the names of the cats changed."""
    done = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
            continue
        key = 0 if node.args else "tensors"
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        out = meta(node)
        if not isinstance(tensors, (list, tuple)) or out is None or len(out[0]) < 2:
            continue
        kept = [t for t in tensors if not ((m := meta(t)) is not None and tuple(m[0]) == (0,))]
        if len(kept) == len(tensors) or not kept or any(meta(t) is None or meta(t)[1] != out[1]
                                                         for t in kept):
            continue  # (an empty operand may still have set the result's dtype)
        if key == 0:
            node.update_arg(0, kept)
        else:
            node.update_kwarg("tensors", kept)
        for t in set(tensors) - set(kept):  # `torch.tensor([])` made for the cat alone
            if isinstance(t, fx.Node) and not t.users and t.op == "call_function" and \
                    t.target in (torch.tensor, torch.empty, torch.zeros):
                graph.erase_node(t)
        done.append(node.name)
    return done
