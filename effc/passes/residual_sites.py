"""Residual branches `h = x + f(x)` in an FX graph: the sites of token_skip (shared, not a pass).

A site is an add whose one operand (the update) is computed from the other (the stream) by a
branch that reads at least one weight, found on targets, not module classes, so Hugging Face
decoders, encoders and ViTs and plain modules look alike. The branch is every node between
the stream and the update that depends on the stream. Its kind is "attention" when it holds an
attention (scaled_dot_product_attention, a softmax, or one an earlier pass put in their place),
else "mlp". A branch can run on a subset
of the tokens only if it is closed (none of its values is used outside it) and reads no other
per-token tensor; otherwise `why` says what stops it.
"""

from __future__ import annotations

import dataclasses
import math
import re

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from effc.compiler.calibration.observer import ADDS, module_of
from effc.compiler.graph_facts import GraphFacts, node_value
from effc.passes.attention_sites import SDPA, unequal_attention

ATTENTION = SDPA + (F.softmax, torch.softmax)  # SDPA first: token_skip reads ATTENTION[:2]
CONVS = (torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d)
RESHAPES = {("call_method", "view"), ("call_method", "reshape"),
            ("call_function", torch.reshape)}
_LAYER = re.compile(r"\.(\d+)\.")


def mixes_tokens(node: fx.Node) -> bool:
    """An attention: SDPA or a softmax, or one an earlier pass put in SDPA's place (kv_proj's
    unequal_attention, effc's attention ops: TokenSelect's, binary attention)."""
    if node.op != "call_function":
        return False
    t = node.target
    return t in ATTENTION or t is unequal_attention or (
        isinstance(t, torch._ops.OpOverload) and t.namespace == "effc" and "attention" in t.name())


def layer_index(name: str) -> int | None:
    """The first number in a dotted module or weight name: `model.layers.3.mlp` -> 3."""
    found = _LAYER.search("." + name + ".")
    return int(found.group(1)) if found else None


@dataclasses.dataclass
class ResidualSite:
    """`add = stream + update`, with the branch computing `update` from `stream`."""

    add: fx.Node
    stream: fx.Node
    update: fx.Node
    branch: list[fx.Node]          # graph order, `update` last
    kind: str                      # "mlp" or "attention"
    name: str                      # the branch's module, e.g. model.layers.0.mlp
    layer: int | None              # the first number in the branch's weight names
    weights: list[str]             # weight names the branch reads, graph order
    why: str = ""                  # non-empty: the branch cannot run on a subset of tokens

    @property
    def key(self) -> str:
        """Unique per site (a layer site and its MLP part share their add node)."""
        return f"{self.kind}:{self.add.name}"

    @property
    def features(self) -> int | None:
        shape = _shape(self.stream)
        return shape[-1] if shape and isinstance(shape[-1], int) else None


def _shape(node: fx.Node) -> tuple | None:
    val = node_value(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _descendants(start: fx.Node, limit: int, order: dict[fx.Node, int]) -> set[fx.Node]:
    seen, stack = set(), [start]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen and order.get(u, limit + 1) <= limit:
                seen.add(u)
                stack.append(u)
    return seen


def _ancestors(end: fx.Node, floor: int, order: dict[fx.Node, int]) -> set[fx.Node]:
    seen, stack = {end}, [end]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen and order.get(a, -1) > floor:
                seen.add(a)
                stack.append(a)
    return seen


def _per_token(node: fx.Node, stream_shape: tuple) -> bool:
    """True if `node`'s value has the stream's token dims (a tensor with one row per token)."""
    shape = _shape(node)
    lead = stream_shape[:-1]
    return shape is not None and len(shape) >= len(lead) and len(lead) > 0 and \
        tuple(shape[:len(lead)]) == tuple(lead) and math.prod(
            s for s in lead if isinstance(s, int)) > 1


def _problem(branch: list[fx.Node], members: set[fx.Node], add: fx.Node, stream: fx.Node,
             facts: GraphFacts) -> str:
    shape = _shape(stream)
    if shape is None or len(shape) < 2:
        return "the residual stream's shape is not known or has no token dimension"
    conv = next((n for n in branch if n.op == "call_function" and n.target in CONVS), None)
    if conv is not None:
        return (f"the block holds a convolution ({conv.name}): it mixes neighbouring "
                f"positions, so it cannot run on a subset of them")
    for n in branch:
        outside = [u for u in n.users if u not in members and u is not add]
        if outside:
            return (f"a value of the block ({n.name}) is also used outside it "
                    f"({outside[0].name}): the keys and values a cache keeps, or a router's state")
        for a in n.all_input_nodes:
            if a in members or a is stream or facts.weight_name(a) is not None \
                    or a.op == "get_attr":
                continue
            if _per_token(a, shape):
                return (f"the block reads another per-token tensor ({a.name}) besides its "
                        f"input stream")
    return ""


def residual_sites(gm: fx.GraphModule, facts: GraphFacts) -> list[ResidualSite]:
    """Every residual add of `gm` whose branch reads a weight, in graph order."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    sites = []
    for node in nodes:
        if not (node.op == "call_function" and node.target in ADDS and len(node.args) == 2
                and all(isinstance(a, fx.Node) for a in node.args)):
            continue
        a, b = node.args
        for stream, update in ((a, b), (b, a)):
            if order[stream] >= order[update]:
                continue
            down = _descendants(stream, order[update], order)
            if update not in down:
                continue
            members = down & _ancestors(update, order[stream], order)
            branch = sorted(members, key=order.__getitem__)
            weights = [facts.weight_name(x) for n in branch for x in n.all_input_nodes
                       if facts.weight_name(x) is not None]
            if not weights or _shape(stream) != _shape(update) or _shape(stream) is None:
                continue
            weights = list(dict.fromkeys(weights))
            matrices = [w for w in weights if facts.weights[w].value.dim() >= 2]
            name = module_of((matrices or weights)[-1])
            kind = "attention" if any(mixes_tokens(n) for n in branch) else "mlp"
            sites.append(ResidualSite(node, stream, update, branch, kind, name,
                                      layer_index(name), weights,
                                      _problem(branch, members, node, stream, facts)))
            break
    return sites


def reshape_sizes(node: fx.Node) -> tuple | None:
    """The target sizes of a view/reshape node (ints, or nodes for symbolic sizes), else None.
    Dynamo spells dynamic sizes as `view(x, torch.Size([2, s0, 128]))`."""
    if (node.op, node.target) not in RESHAPES or len(node.args) < 2:
        return None
    arg = node.args[1]
    if len(node.args) == 2 and isinstance(arg, fx.Node) and arg.target is torch.Size:
        return tuple(arg.args[0])
    if len(node.args) == 2 and isinstance(arg, (tuple, list)):
        return tuple(arg)
    return tuple(node.args[1:])


def size_expr(x: int | torch.SymInt) -> sympy.Expr:
    """A size as a sympy expression (a SymInt's own, without adding a guard)."""
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def same_size(a, b) -> bool:
    """Two sizes are equal: ints or SymInts (a size argument may be the node of one),
    compared as expressions, so no guard is added."""
    a, b = (node_value(x) if isinstance(x, fx.Node) else x for x in (a, b))
    if not all(isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool) for x in (a, b)):
        return False
    return sympy.expand(size_expr(a) - size_expr(b)) == 0


def flatten_token_sizes(node: fx.Node, lead: tuple, keep_batch: bool = False) -> bool:
    """Make a view/reshape inside a branch that names the stream's token sizes (`lead`, such
    as (batch, tokens)) work on any number of rows: (B, T, n) -> (1, -1, n), or (B, -1, n)
    with `keep_batch` (the rows are B sequences of equally many tokens), and (B*T, n) ->
    (-1, n). True if the node was changed."""
    sizes = reshape_sizes(node)
    if sizes is None or not lead:
        return False
    k = len(lead)
    if len(sizes) > k and all(same_size(a, b) for a, b in zip(sizes, lead)):
        head = tuple(sizes[:k - 1]) if keep_batch else (1,) * (k - 1)
        rest = list(sizes[k:])
        if -1 in rest:  # (B, T, -1, d) -> (B, -1, H, d): the inferred size, from the trace
            shape = _shape(node)
            i = rest.index(-1)
            if shape is None or len(shape) != len(sizes) or not isinstance(shape[k + i], int):
                return False
            rest[i] = shape[k + i]
        new = head + (-1,) + tuple(rest)
    elif sizes and all(isinstance(s, int) for s in lead) and isinstance(sizes[0], int) \
            and sizes[0] == math.prod(lead) and -1 not in sizes[1:]:
        new = (-1,) + tuple(sizes[1:])
    elif keep_batch and not (isinstance(lead[-1], int) and lead[-1] <= 1):
        new = _free_token_axis(node, sizes, lead[-1])
        if new is None:
            return False
    else:
        return False
    node.args = (node.args[0], new)
    return True


def _free_token_axis(node: fx.Node, sizes: tuple, tokens) -> tuple | None:
    """(B, -1, T, d) -> (B, H, -1, d): the token count (an int, or the SymInt of a dynamic
    length) where heads moved it (an attention's output), if it is the only size equal to it
    after the batch."""
    shape = _shape(node)
    if shape is None or len(shape) != len(sizes):
        return None
    where = [i for i, s in enumerate(sizes) if i > 0 and same_size(s, tokens)]
    if len(where) != 1 or not same_size(shape[where[0]], tokens):
        return None
    new = [shape[i] if isinstance(s, int) and s == -1 else s for i, s in enumerate(sizes)]
    new[where[0]] = -1
    if not all(isinstance(s, int) for s in new[1:]):
        return None
    return tuple(new)


def layer_sites(sites: list[ResidualSite]) -> list[ResidualSite]:
    """`sites` with each layer's attention site and the MLP site that reads its add merged
    into one "layer" site: x -> attention -> add -> MLP -> add, a token skipping the whole
    layer keeps x. Its `update` is the last add (h, not h - x); its branch runs through the
    first add."""
    out, used = [], set()
    for a in sites:
        if a.kind != "attention":
            continue
        m = next((s for s in sites if s.kind == "mlp" and s.stream is a.add), None)
        if m is None:
            continue
        outside = [u for u in a.add.users if u not in m.branch and u is not m.add]
        why = a.why or m.why or (f"the attention's output ({a.add.name}) is also used outside "
                                 f"the layer ({outside[0].name})" if outside else "")
        prefix = _common_module(a.name, m.name)
        out.append(ResidualSite(m.add, a.stream, m.add, a.branch + [a.add] + m.branch, "layer",
                                prefix, a.layer, a.weights + m.weights, why))
        used.update((id(a), id(m)))
    return out


def _common_module(a: str, b: str) -> str:
    parts = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts) or a

