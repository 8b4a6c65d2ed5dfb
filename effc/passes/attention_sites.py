"""Attention in an FX graph, shared by the passes (not a pass): the projections an
attention's queries, keys and values are split from, and the reshapes that merge its output
into the output projection.

A projection is F.linear (W [out, in]) or transformers' Conv1D, addmm on the flattened tokens
(W [in, out]); a fused one (GPT-2's c_attn: q, k and v side by side, then split) is found
through its split. kv_proj folds its bases into what these find (kv_proj_weights.py); token
skip's residual sites name attention by the same SDPA targets, and by `unequal_attention`,
the attention kv_proj puts in SDPA's place where keys and values differ in width.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

from effc.compiler.graph_facts import hinted, node_value

SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
MATMULS = (torch.matmul, operator.matmul)
_MOVES = ("reshape", "view", "transpose", "contiguous", "permute", "flatten")
NOT_HEADS = "not a projection's output split into heads"


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def strip_to(node):
    """`node` without the `.to(...)` calls around it."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to":
        node = node.args[0]
    return node


def is_method(node, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _is_param(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder"


def view_sizes(view: fx.Node) -> tuple:
    """The sizes a view/reshape node asks for: its arguments, a tuple, or a torch.Size node's."""
    sizes = view.args[1] if len(view.args) == 2 else tuple(view.args[1:])
    if isinstance(sizes, fx.Node) and sizes.op == "call_function" and sizes.target is torch.Size:
        sizes = sizes.args[0]
    return tuple(sizes) if isinstance(sizes, (tuple, list)) else (sizes,)


@dataclasses.dataclass(frozen=True)
class Projection:
    """x W^T + b as the graph computes it: `call` is F.linear (W [out, in]) or addmm on the
    flattened tokens (W [in, out], transformers' Conv1D); `out` is what the model reads (the
    addmm's view back to [B, T, out], else `call`)."""

    call: fx.Node
    out: fx.Node
    x: fx.Node
    w: fx.Node
    b: fx.Node | None
    io: bool  # W stored [in, out]


def projection(node) -> Projection | None:
    """The projection whose output `node` is, or None."""
    if not isinstance(node, fx.Node):
        return None
    if (node.op == "call_function" and node.target in LINEARS and _is_param(node.args[1])):
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return Projection(node, node, node.args[0], node.args[1], bias, False)
    call = node.args[0] if is_method(node, "view", "reshape") else node
    if (isinstance(call, fx.Node) and call.op == "call_function" and call.target is torch.addmm
            and len(call.args) == 3 and not call.kwargs and _is_param(call.args[2])
            and _is_param(call.args[0]) and (call is node or only_user(call) is node)):
        return Projection(call, node, call.args[1], call.args[2], call.args[0], True)
    return None


@dataclasses.dataclass(frozen=True)
class Part:
    """Columns [start, stop) of a projection's output, split into heads: `heads` is
    transpose(view(columns, sizes), 1, 2), [B, n, T, d]."""

    proj: Projection
    start: int
    stop: int
    columns: fx.Node  # proj.out, or a getitem of its split
    sizes: tuple
    heads: fx.Node


def split_widths(split: fx.Node) -> list[int] | None:
    """The widths of a split along the last dim, from its traced value, else None."""
    dim = split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
    value, whole = node_value(split), node_value(split.args[0])
    if not isinstance(value, (tuple, list)) or not isinstance(whole, torch.Tensor):
        return None
    return [hinted(v.shape[-1]) for v in value] if dim in (-1, whole.dim() - 1) else None


def heads_part(heads) -> Part | str:
    """The projection columns that `heads` [B, n, T, d] was split from, else why not."""
    if not (is_method(heads, "transpose") and set(heads.args[1:]) == {1, 2}):
        return NOT_HEADS
    view = heads.args[0]
    if not (is_method(view, "view", "reshape") and only_user(view) is heads):
        return NOT_HEADS
    columns = view.args[0]
    if not (isinstance(columns, fx.Node) and only_user(columns) is view):
        return NOT_HEADS
    found = projection(columns)
    if found is not None:
        return Part(found, 0, hinted(node_value(columns).shape[-1]), columns,
                    view_sizes(view), heads)
    if not (columns.op == "call_function" and columns.target is operator.getitem
            and is_method(columns.args[0], "split")):
        return NOT_HEADS
    split, index = columns.args
    found = projection(split.args[0])
    widths = split_widths(split)
    if (found is None or widths is None or only_user(split.args[0]) is not split
            or not all(u.target is operator.getitem and isinstance(u.args[1], int)
                       for u in split.users)):
        return NOT_HEADS
    start = sum(widths[:index])
    return Part(found, start, start + widths[index], columns, view_sizes(view), heads)


def merge_chain(out: fx.Node, shape: torch.Size) -> tuple[list[fx.Node], Projection] | str:
    """(the reshapes between the attention output [B, H, T, d] and o_proj, o_proj) when they
    only merge heads, as transpose(1, 2).flatten(-2) does (with the tokens flattened too for
    an addmm; checked by running them on positions), else why not."""
    chain, node = [], out
    while True:
        user = only_user(node)
        if user is None:
            return "the attention output has several users"
        found = projection(user)
        if found is not None and found.x is node:
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
    if found.io:
        want = want.flatten(0, -2)
    if t.shape != want.shape or not torch.equal(t, want):
        return "the reshapes before the output projection do more than merge the heads"
    return chain, found


def unequal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, scale: float = 1.0
                      ) -> torch.Tensor:
    """softmax(scale q k^T + mask) v for decode steps whose keys and values differ in width.
    SDPA's fused kernels need one width, and its fallback took 1.3-1.7x this one's time on a
    2-core CPU (one query, 256-8k cached tokens). Grouped queries read their KV head in place
    when there is no mask; scores and softmax are computed in fp32 for half types."""
    b, h, t, _ = q.shape
    g = k.shape[1]
    if h != g and attn_mask is None:
        out = unequal_attention(q.reshape(b, g, h // g * t, q.shape[-1]), k, v, scale=scale)
        return out.reshape(b, h, t, v.shape[-1])
    if h != g:
        k, v = k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    return scores.softmax(-1).to(v.dtype) @ v
