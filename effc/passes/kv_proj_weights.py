"""kv_proj, prefill graphs: the value bases folded into W_v and W_o, computed in the graph.

After the attention fold (kv_proj.py), each layer of a projected cache still computes, per KV
head g with basis P_g [d, r] and mean mu_g (zero when uncentered),

    v = (x W_v^T + b_v - mu) P                 what the cache stores, [B, G, T, r]
    y = merge_heads(A L P^T + mu) W_o^T + b_o  the attention output projected

With W_v' = P^T W_v and b_v' = P^T (b_v - mu) per head, and W_o' = W_o blockdiag(P) and
b_o' = b_o + W_o mu (over each query head's KV head), v_proj writes the r-wide values and
o_proj reads them: exact algebra, and both projections do r/d of their work.

Why in the graph and not as constants: the bases and means belong to the cache object the
model is called with and reach the graph as inputs. Weights folded at compile time would give
another cache's calls wrong answers without any error. Computing W_v' and W_o' costs about as
much as projecting d r / (d - r) tokens, so a graph is folded only when it projects more
tokens than that (prefills, not decode steps).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from effc.compiler.graph_facts import hinted, node_value

LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
MATMULS = (torch.matmul, operator.matmul)
_MOVES = ("reshape", "view", "transpose", "contiguous", "permute", "flatten")


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def strip_to(node):
    """`node` without the `.to(...)` calls around it."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to":
        node = node.args[0]
    return node


def _is_linear(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in LINEARS
            and isinstance(node.args[1], fx.Node) and node.args[1].op == "placeholder")


def _linear_parts(lin: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    return lin.args[0], lin.args[1], bias


def value_store(graph: fx.Graph, basis: fx.Node, mean: fx.Node | None
                ) -> tuple[fx.Node, fx.Node, tuple, fx.Node, fx.Node | None] | str:
    """(store node `... @ P`, the v_proj linear, the head view's sizes, and the basis and
    mean nodes the store reads) where the cache projects the new values as
    (x W_v^T + b - mu) P, else why not."""
    placeholder = strip_to(basis)
    stores = [n for n in graph.nodes if n.op == "call_function"
              and n.target in MATMULS
              and strip_to(n.args[1]) is placeholder]
    if len(stores) != 1:
        return f"{len(stores)} places project new values with this basis"
    store = stores[0]
    x, store_mean = store.args[0], None
    if mean is not None:
        if not (isinstance(x, fx.Node) and x.op == "call_function"
                and x.target in (torch.sub, operator.sub)
                and strip_to(x.args[1]) is strip_to(mean) and _only_user(x) is store):
            return "the new values' mean is not subtracted right before the projection"
        x, store_mean = x.args[0], x.args[1]
    tr = x
    if not (isinstance(tr, fx.Node) and tr.op == "call_method" and tr.target == "transpose"
            and set(tr.args[1:]) == {1, 2} and len(tr.users) == 1):
        return "the new values are not v_proj's output split into heads"
    view = tr.args[0]
    if not (isinstance(view, fx.Node) and view.op == "call_method" and view.target == "view"
            and _only_user(view) is tr and _is_linear(view.args[0])
            and _only_user(view.args[0]) is view):
        return "the new values are not v_proj's output split into heads"
    sizes = view.args[1] if len(view.args) == 2 and isinstance(view.args[1], (tuple, list)) \
        else tuple(view.args[1:])
    return store, view.args[0], tuple(sizes), store.args[1], store_mean


def merge_chain(out: fx.Node, shape: torch.Size) -> tuple[list[fx.Node], fx.Node] | str:
    """(the reshapes between the attention output [B, H, T, d] and o_proj, the o_proj linear)
    when they only merge heads, as transpose(1, 2).flatten(-2) does (checked by running them
    on positions), else why not."""
    chain, node = [], out
    while True:
        user = _only_user(node)
        if user is None:
            return "the attention output has several users"
        if _is_linear(user) and user.args[0] is node:
            break
        if user.op != "call_method" or user.target not in _MOVES:
            return f"{user.name} between the attention output and its projection"
        chain.append(user)
        node = user
    concrete = lambda a: (hinted(node_value(a)) if isinstance(a, fx.Node) else  # noqa: E731
                          tuple(concrete(b) for b in a) if isinstance(a, (tuple, list)) else a)
    index = torch.arange(math.prod(shape)).view(*shape)
    t = index
    for n in chain:
        t = getattr(t, n.target)(*(concrete(a) for a in n.args[1:]),
                                 **{k: concrete(v) for k, v in n.kwargs.items()})
    want = index.transpose(1, 2).flatten(-2)
    if t.shape != want.shape or not torch.equal(t, want):
        return "the reshapes before the output projection do more than merge the heads"
    return chain, user


def worth_it(tokens: int, d: int, r: int) -> bool:
    """Folding costs about d r token-projections' work; it saves (d - r) per token."""
    return tokens * (d - r) > d * r


def fold_value_in(graph: fx.Graph, store: fx.Node, lin: fx.Node, sizes: tuple,
                  basis: fx.Node, mean: fx.Node | None, groups: int, d: int, r: int) -> None:
    """v_proj with W_v' = P^T W_v, b_v' = P^T (b_v - mu) per KV head, split into r-wide heads,
    in place of the cache's projection of its output."""
    x, w, b = _linear_parts(lin)
    call = graph.call_function
    with graph.inserting_before(store):
        w3 = graph.call_method("view", (w, (groups, d, -1)))
        wf = graph.call_method("reshape", (call(torch.einsum, ("gdr,gdi->gri", basis, w3)),
                                           (groups * r, -1)))
        shift = None
        if b is not None:
            shift = graph.call_method("view", (b, (groups, d)))
        if mean is not None:
            mu = graph.call_method("reshape", (mean, (groups, d)))
            shift = call(torch.neg, (mu,)) if shift is None else call(torch.sub, (shift, mu))
        bias = None if shift is None else graph.call_method("reshape", (
            call(torch.einsum, ("gdr,gd->gr", basis, shift)), (groups * r,)))
        new = call(lin.target, (x, wf, bias))
        heads = graph.call_method("view", (new, tuple(sizes[:-1]) + (r,)))
        split = graph.call_method("transpose", (heads, 1, 2))
    store.replace_all_uses_with(split)


def fold_value_out(graph: fx.Graph, attn: fx.Node, out_lin: fx.Node, per_head_basis: fx.Node,
                   per_head_mean: fx.Node | None, heads: int, d: int, r: int) -> None:
    """o_proj with W_o' = W_o blockdiag(P) and b_o' = b_o + W_o mu, reading the r-wide
    attention output [B, H, T, r] with its heads merged."""
    _, w, b = _linear_parts(out_lin)
    call = graph.call_function
    with graph.inserting_before(out_lin):
        w3 = graph.call_method("view", (w, (-1, heads, d)))
        wf = graph.call_method("flatten", (call(torch.einsum, ("ohd,hdr->ohr", w3,
                                                               per_head_basis)), -2))
        bias = b
        if per_head_mean is not None:
            shift = call(torch.mv, (w, graph.call_method("reshape", (per_head_mean, (-1,)))))
            bias = shift if b is None else call(torch.add, (b, shift))
        merged = graph.call_method("flatten", (graph.call_method("transpose", (attn, 1, 2)), -2))
        new = call(out_lin.target, (merged, wf, bias))
    out_lin.replace_all_uses_with(new)
