"""token_skip's attention blocks: which can have only the routed tokens attend, and the
rewrites that do it (shared by token_skip.py; not a pass).

keys="all": in encoders and ViTs without a mask, the nodes that compute the queries are
copied onto the gathered rows (`queries_only`); in decoders, whose keys and values feed the
cache, and in masked encoders, every token computes its keys and values, and only the routed
tokens' queries are computed (`queries_on_routed_rows`: q_proj and RoPE on their rows) and
attend, with their rows of the mask (`queries_at_attention`). keys="selected" in a decoder
(Mixture-of-Depths proper): the whole block runs on the routed tokens, with RoPE's angles at
their positions (`compact_branch`); at batch 1 only they append keys and values to the
cache; at batch B, whose sequences route different numbers, each sequence runs as many rows
as the one that routes the most, and the layer's cache keeps a row per token, the skipped
ones marked and hidden on every later step (`_marked_attention`). In an encoder, its
padding mask keeps the routed tokens' rows and columns (`routed_masks`). The nodes that then
see fewer rows are freed of the token count by following it (by the product of the sizes
before it, which reshapes keep), so a count equal to a head size or head count is never
mistaken for it.
"""

from __future__ import annotations

import math
import operator

import sympy
import torch
import torch.fx as fx

from effc.compiler.graph_facts import ValueCapture, node_arg, node_value
from effc.passes.budget import EndToEnd
from effc.passes.residual_sites import (ATTENTION, ResidualSite, flatten_token_sizes,
                                        reshape_sizes, same_size, size_expr)
from effc.passes.token_skip_math import (cached_rows_mask, causal_rows, compact_rows_mask,
                                        select_along, select_mask, select_rows,
                                        marked_rows, spread_rows)


def is_causal(gm: fx.GraphModule) -> bool:
    """A decoder's graph: a causal attention, or keys/values the graph returns for a cache."""
    outputs = set(next(n for n in reversed(gm.graph.nodes) if n.op == "output").all_input_nodes)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in ATTENTION[:2]:
            if node_arg(n, 5, "is_causal", False):
                return True
            if any(a in outputs for a in n.args[1:3] if isinstance(a, fx.Node)):
                return True
    return False


def masks_are_causal(gm: fx.GraphModule, ctx) -> bool:
    """A decoder's graph whose causal mask is a tensor (called without a cache, with an
    attention_mask): True if on the call being compiled every attention mask with a row per
    query hides each query's later keys. Structure alone cannot tell such a mask from an
    encoder's padding mask."""
    masks = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in ATTENTION[:2]:
            m, q = node_arg(n, 3, "attn_mask"), node_value(n.args[0])
            mv = node_value(m) if isinstance(m, fx.Node) else None
            if isinstance(mv, torch.Tensor) and isinstance(q, torch.Tensor) and \
                    mv.dim() >= 2 and same_size(mv.shape[-2], q.shape[-2]) and \
                    not same_size(q.shape[-2], 1):
                masks.append(m)
    if not masks:
        return False
    args = EndToEnd.example_args(gm, ctx.facts)
    if args is None:
        return False
    cap = ValueCapture(gm, {m.name for m in masks})
    with torch.no_grad():
        cap.run(*ctx.facts.fresh(args))
    for m in masks:
        v = cap.values[m.name]
        seen = v if v.dtype == torch.bool else v > torch.finfo(v.dtype).min / 2
        tq, tk = v.shape[-2:]
        later = torch.ones(tq, tk, dtype=torch.bool, device=v.device).triu(1 + tk - tq)
        if not later.any() or seen[..., later].any():
            return False
    return True


def queries_only(graph: fx.Graph, site: ResidualSite, rows: fx.Node, lead: tuple) -> None:
    """keys="all": the routed tokens' queries attend to every token's keys and values. The
    nodes that compute the queries are copied onto the gathered rows (a norm the keys share
    is computed twice, once per set of rows); keys, values and the attention's inputs
    otherwise stay on the whole stream; the nodes after the attention see routed rows."""
    attn = next(n for n in site.branch if n.op == "call_function" and n.target in ATTENTION[:2])
    queries = _within(attn.args[0], set(site.branch))
    env = {site.stream: rows}
    with graph.inserting_before(attn):
        for n in site.branch:
            if n in queries:
                env[n] = graph.node_copy(n, lambda a: env.get(a, a))
                flatten_token_sizes(env[n], lead, keep_batch=True)
    attn.args = (env.get(attn.args[0], attn.args[0]),) + tuple(attn.args[1:])
    free_query_rows(site.branch[site.branch.index(attn):], node_value(attn).dim() - 2)


def attention_node(site: ResidualSite) -> fx.Node | None:
    found = [n for n in site.branch if n.op == "call_function" and n.target in ATTENTION[:2]]
    return found[0] if len(found) == 1 else None


def queries_problem(site: ResidualSite, keys: str) -> str:
    """Why a decoder's attention block (or a masked encoder's) cannot have only its routed
    tokens' queries attend (every token still computes and caches its keys and values), or
    ""."""
    if keys == "selected":
        return compact_problem(site)
    attn = attention_node(site)
    if attn is None:
        return "the block holds no single scaled_dot_product_attention"
    shape = site.stream.meta["example_value"].shape if "example_value" in site.stream.meta \
        else None
    if shape is None or len(shape) != 3:
        return "the block's input is not [batch, tokens, features]"
    if node_value(attn.args[0]) is None or node_value(attn.args[0]).dim() != 4:
        return "the attention's queries are not [batch, heads, tokens, head size]"
    members = set(site.branch)
    query_side = _within(attn.args[0], members)
    after = set(site.branch[site.branch.index(attn):])
    for n in site.branch:
        outside = [u for u in n.users if u not in members and u is not site.add]
        if outside and (n in query_side or n in after):
            return (f"a value of the block ({n.name}) on the queries' side is also used "
                    f"outside it ({outside[0].name})")
    stream_shape = tuple(shape)
    mask = node_arg(attn, 3, "attn_mask")
    for n in after:
        for a in n.all_input_nodes:
            if n is attn and a is mask:  # its rows are selected with the queries
                continue
            if a not in members and _per_token_input(a, stream_shape):
                return (f"the block reads another per-token tensor ({a.name}) after its "
                        f"attention")
    return ""


def _set_arg(node: fx.Node, pos: int, name: str, value) -> None:
    """Set argument `name` of a call, where it was given: at position `pos`, else by keyword."""
    if len(node.args) > pos:
        node.args = node.args[:pos] + (value,) + node.args[pos + 1:]
    else:
        node.kwargs = {**node.kwargs, name: value}


def _per_token_input(node: fx.Node, stream_shape: tuple) -> bool:
    val = node.meta.get("example_value")
    return isinstance(val, torch.Tensor) and tuple(val.shape[:2]) == stream_shape[:2]


def _within(start: fx.Node, members: set[fx.Node]) -> set[fx.Node]:
    """`start` and the nodes of `members` it is computed from."""
    seen, stack = set(), [start] if start in members else []
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(a for a in n.all_input_nodes if a in members)
    return seen


def queries_at_attention(graph: fx.Graph, site: ResidualSite, positions: fx.Node,
                          lead: tuple) -> None:
    """A decoder's attention with only the routed tokens' queries: every token still
    computes its keys and values, which the cache keeps, so later steps see the same cache as
    the unrouted model. The queries at `positions` ([B, K] per sequence) are selected where
    they enter the attention (after RoPE, which reads per-token angles), the mask's rows with
    them; a causal attention gets the explicit mask of those rows (query at position i sees
    keys 0..i, as is_causal does); the nodes after the attention see K rows per sequence.
    Where it can, the routed queries alone are computed (`queries_on_routed_rows`)."""
    attn = attention_node(site)
    rank = node_value(attn.args[0]).dim()
    mask = node_arg(attn, 3, "attn_mask")
    causal = node_arg(attn, 5, "is_causal", False)
    q_rows = queries_on_routed_rows(graph, site, attn, positions)
    with graph.inserting_before(attn):
        if q_rows is None:  # the queries of every token, then the routed ones'
            q_rows = graph.call_function(select_rows, (attn.args[0], positions))
        if isinstance(mask, fx.Node):
            m = node_value(mask)
            if m is not None and not same_size(m.shape[-2], 1):  # a row per query: keep theirs
                mask = graph.call_function(select_rows, (mask, positions))
        elif causal:
            keys = graph.call_method("size", (attn.args[1], -2))
            mask = graph.call_function(causal_rows, (positions, keys))
    attn.args = (q_rows,) + tuple(attn.args[1:])
    _set_arg(attn, 3, "attn_mask", mask)
    _set_arg(attn, 5, "is_causal", False)
    free_query_rows(site.branch[site.branch.index(attn):], rank - 2)


def queries_on_routed_rows(graph: fx.Graph, site: ResidualSite, attn: fx.Node,
                           positions: fx.Node) -> fx.Node | None:
    """The routed tokens' queries computed on their rows alone: the nodes that only the
    queries need (q_proj, RoPE on q) are copied onto the rows, at `positions` [B, K], of the
    last value the queries share with the keys and values that is laid out like the stream
    ([B, T, n]: the norm's output in a Llama); per-token tensors from outside the block
    (RoPE's cos and sin) are selected at the same positions. The copies' node, or None where
    the tokens cannot be followed (the queries are then selected at the attention; copies
    left unused are dead code)."""
    members = set(site.branch)
    queries = _within(attn.args[0], members)
    kv = set().union(*(_within(a, members) for a in attn.args[1:3] if isinstance(a, fx.Node)))
    b, t = node_value(site.stream).shape[:2]

    def stream_like(n: fx.Node) -> bool:
        v = node_value(n)
        return isinstance(v, torch.Tensor) and v.dim() == 3 and same_size(v.shape[0], b) \
            and same_size(v.shape[1], t)

    shared = [n for n in site.branch if n in queries and n in kv and stream_like(n)]
    start = shared[-1] if shared else site.stream
    done = _within(start, members) | {start}
    copied = [n for n in site.branch if n in queries and n not in done]
    if not copied or any(a in done and a is not start for n in copied
                         for a in n.all_input_nodes):
        return None

    pick = _per_sequence_pick(graph, positions, b)
    with graph.inserting_before(attn):
        rows = graph.call_function(select_rows, (start, positions))
        env, before = {start: rows}, {rows: b}
        for n in copied:
            env[n] = graph.node_copy(n, lambda a: env.get(a, a))
    try:
        for n in copied:
            c = env[n]
            src = next((a for a in c.all_input_nodes if a in before), None)
            if src is None:  # computed from outside inputs only (cos.unsqueeze(1))
                continue
            val, out = node_value(start if src is rows else src), node_value(c)
            if _through_split(n, val, out):
                before[c] = before[src]
                continue
            _select_side_inputs(graph, c, members, before, t, pick)
            before[c] = _follow(c, val, out, before[src], t)
    except RuntimeError:
        return None
    return env.get(attn.args[0])


def _per_sequence_pick(graph: fx.Graph, positions: fx.Node, batch):
    """`_select_side_inputs`' pick for routed rows at `positions` [B, K] per sequence: a
    per-token input from outside the block (RoPE's cos, sin) at those positions along its
    token axis `at`, per sequence where a batch axis (B or 1) leads, else at batch 1 as a
    flat index; RuntimeError otherwise."""
    def pick(a, at, side, out):
        if at >= 1 and side.dim() == out.dim():
            return graph.call_function(select_along, (a, at, positions))
        if isinstance(batch, int) and batch == 1:
            return graph.call_function(torch.index_select, (
                a, at, graph.call_method("reshape", (positions, (-1,)))))
        raise RuntimeError(f"{a.name}: a per-token input without a batch axis")
    return pick


def _divides(a, b) -> bool:
    """a divides b (sizes: ints or SymInts, as sympy; no guard added)."""
    return sympy.fraction(sympy.cancel(size_expr(b) / size_expr(a)))[1] == 1


def _query_axis(shape, before, k) -> int | None:
    """The axis of `shape` that holds the queries, given the product of the sizes before them
    in row-major order (`before`) and their number `k`: the axis whose leading product divides
    `before` and whose trailing product is a multiple of before * k; never the last axis
    (features) of a tensor with more than one. Of several (size-1 axes around one query),
    the one of size k at exactly `before`, the last of them."""
    lead = [math.prod(shape[:j]) if j else 1 for j in range(len(shape) + 1)]
    hits = [j for j in range(max(len(shape) - 1, 1)) if _divides(lead[j], before)
            and _divides(before * k, lead[j + 1])]
    exact = [j for j in hits if same_size(lead[j], before) and same_size(shape[j], k)]
    if len(hits) == 1:
        return hits[0]
    return exact[-1] if exact and (len(exact) == 1 or same_size(k, 1)) else None


def free_query_rows(nodes: list[fx.Node], axis: int) -> None:
    """Free the nodes after an attention (nodes[0]) from the number of queries, which sits on
    `axis` of its output: follow the queries (by the product of the sizes before them, which
    reshapes keep) through reshapes, views, transposes and shape-keeping ops, and give each
    view/reshape -1 where they land, so a query count equal to the head size or head count
    is not mistaken for them, and a view that merges them with the batch (GPT-2's Conv1D)
    still scales. RuntimeError where they cannot be followed: the block is kept whole."""
    first = node_value(nodes[0])
    k = first.shape[axis]
    before = {nodes[0]: math.prod(first.shape[:axis]) if axis else 1}
    for n in nodes[1:]:
        src = next((a for a in n.all_input_nodes if a in before), None)
        if src is None:
            continue
        val, out = node_value(src), node_value(n)
        if not isinstance(val, torch.Tensor) or not isinstance(out, torch.Tensor):
            raise RuntimeError(f"{n.name}: the shape after the attention is not known")
        before[n] = _follow(n, val, out, before[src], k)


def masked(site: ResidualSite) -> bool:
    """True if an attention in the block takes a mask (one row per query: it would have to
    be gathered with the queries)."""
    return any(n.op == "call_function" and n.target in ATTENTION[:2]
               and node_arg(n, 3, "attn_mask") is not None for n in site.branch)


def compact_problem(site: ResidualSite, whole_layer: bool = False) -> str:
    """Why a decoder's attention block (or whole layer) cannot run on its routed tokens alone
    (keys="selected", Mixture-of-Depths proper: a skipped token computes no keys or values
    and writes none to the cache), or "". Of the block's values, only those the graph
    returns (the cache's keys and values) may be used outside it."""
    members = set(site.branch)
    for n in site.branch:
        outside = [u for u in n.users if u not in members and u is not site.add]
        if any(u.op != "output" for u in outside):
            return (f"a value of the block ({n.name}) is also used outside it "
                    f"({outside[0].name})")
    if whole_layer:
        stream_shape = tuple(node_value(site.stream).shape)
        attn = attention_node(site)
        for n in site.branch[site.branch.index(attn or site.branch[0]):]:
            for a in n.all_input_nodes:
                if n is attn and a is node_arg(attn, 3, "attn_mask"):  # rows with the queries
                    continue
                if a not in members and a is not site.stream and \
                        _per_token_input(a, stream_shape):
                    return (f"the layer reads another per-token tensor ({a.name}) after its "
                            f"attention")
    attn = attention_node(site)
    if attn is None:
        return "the block holds no single scaled_dot_product_attention"
    shape = node_value(site.stream).shape if isinstance(node_value(site.stream),
                                                        torch.Tensor) else None
    if shape is None or len(shape) != 3:
        return "the block's input is not [batch, tokens, features]"
    if node_value(attn.args[0]) is None or node_value(attn.args[0]).dim() != 4:
        return "the attention's queries are not [batch, heads, tokens, head size]"
    if site.stream not in _within(attn.args[1], members | {site.stream}):
        return "the attention's keys are not computed from the block's input (cross-attention)"
    return ""


def compact_branch(graph: fx.Graph, site: ResidualSite, rows: fx.Node, index: fx.Node,
                   positions: fx.Node | None = None, weight: fx.Node | None = None) -> None:
    """keys="selected" in a decoder: the whole block runs on the routed rows (`rows`). At
    batch 1 they are the tokens at positions `index`; at batch B, [B, K] rows per sequence
    at `positions` (per_sequence: its routed tokens, then fillers, `weight` 0). Per-token
    inputs the block reads besides its stream (RoPE's cos and sin) are selected at those
    positions along the token axis, which is followed from the stream through every node
    (by the product of the sizes before it); the keys and values it appends to the cache are
    the routed rows' only. At batch 1, a mask with a row and a column per token keeps the
    routed ones; with cached keys, a mask cannot be mapped onto the layer's own (shorter)
    cache: RuntimeError, the block is kept whole. At batch B, see `_marked_attention`."""
    members = set(site.branch)
    k = node_value(site.stream).shape[-2]
    before = {site.stream: node_value(site.stream).shape[0]}  # the batch is before the tokens
    attn = attention_node(site)
    cats = []
    pick = (_per_sequence_pick(graph, positions, before[site.stream]) if positions is not None
            else lambda a, at, side, out: graph.call_function(torch.index_select,
                                                              (a, at, index)))
    for n in site.branch:
        n.args = fx.node.map_arg(n.args, lambda a: rows if a is site.stream else a)
        n.kwargs = fx.node.map_arg(n.kwargs, lambda a: rows if a is site.stream else a)
        src = next((a for a in n.all_input_nodes if a in before or a is rows), None)
        src = site.stream if src is rows else src
        if src is None:
            continue
        val, out, b = node_value(src), node_value(n), before[src]
        if n.op == "call_function" and n.target is torch.cat:
            dim = node_arg(n, 1, "dim", 0) % out.dim()
            if _query_axis(val.shape, b, k) == dim:  # the cache: past keys + the routed ones
                cats.append(n)
                continue
        if n is attn:
            if positions is None:
                _compact_mask(graph, n, index, k)
            else:
                _marked_attention(graph, site, cats, positions, weight)
            before[n] = math.prod(out.shape[:-2])
            continue
        if _through_split(n, val, out):
            before[n] = b  # GPT-2's c_attn(x).split(d, dim=2) and its items
            continue
        _select_side_inputs(graph, n, members, before, k, pick)
        before[n] = _follow(n, val, out, b, k)


def _marked_attention(graph: fx.Graph, site: ResidualSite, cats: list[fx.Node],
                      positions: fx.Node, weight: fx.Node) -> None:
    """A decoder's routed attention at batch B, whose sequences route different numbers of
    tokens (K rows each, at `positions`, fillers of `weight` 0). With a cache, the layer
    keeps a row per token, as every layer does (the model's mask, built for the first
    layer's cache, then fits this one): the routed rows' keys and values go to their
    tokens' rows, and every other row is a marked one (token_skip_math.spread_rows), which
    this and every later step hides: the attention takes the model's mask of the routed
    queries with the marked rows hidden (without a mask: causal, as in a decoder). Without a
    cache, the routed rows attend among themselves, causally, fillers hidden.
    RuntimeError where the cache is not one [batch, heads, tokens, head size] tensor each
    for keys and values."""
    attn = attention_node(site)
    members = set(site.branch)
    mask = node_arg(attn, 3, "attn_mask")
    joins = [[c for c in cats if c in _within(attn.args[i], members)] for i in (1, 2)]
    if not any(joins):
        left = [n for i in (1, 2) for n in _within(attn.args[i], members)
                if any(u.op == "output" for u in n.users)]
        if left:  # a cache kept outside the graph would get the fillers' rows, unmarked
            raise RuntimeError(f"the graph returns {left[0].name} without a cache this rewrite "
                               f"can mark (at batch > 1, a routed layer's cache marks rows)")
        with graph.inserting_before(attn):
            mask = graph.call_function(compact_rows_mask, (mask, positions, weight))
    elif any(len(j) != 1 for j in joins):
        raise RuntimeError("the attention's keys or values do not join one cache each")
    else:
        with graph.inserting_before(site.branch[0]):
            tokens = graph.call_method("size", (site.stream, -2))
        compact = []
        for (cat,), keys in zip(joins, (True, False)):
            v = node_value(cat)
            if not isinstance(v, torch.Tensor) or v.dim() != 4 or \
                    node_arg(cat, 1, "dim", 0) % 4 != 2:
                raise RuntimeError(f"{cat.name}: the cache is not [batch, heads, tokens, "
                                   f"head size]")
            parts = list(cat.args[0])
            new = [i for i, p in enumerate(parts) if p in members]
            if len(new) != 1:
                raise RuntimeError(f"{cat.name}: cannot tell the new rows from the cached ones")
            rows = parts[new[0]]
            with graph.inserting_before(cat):
                parts[new[0]] = graph.call_function(spread_rows, (
                    rows, positions, weight, tokens, keys))
            cat.args = (parts,) + tuple(cat.args[1:])
            compact.append((cat, rows, [p for i, p in enumerate(parts) if i != new[0]]))
        if _attend_compact(site, attn, compact):  # a prefill: no cached rows yet
            if mask is None and node_arg(attn, 5, "is_causal", False):
                return  # the routed rows come first in each sequence, in order
            with graph.inserting_before(attn):
                mask = graph.call_function(compact_rows_mask, (mask, positions, weight))
        else:
            with graph.inserting_after(joins[1][0]):
                hidden = graph.call_function(marked_rows, (joins[1][0],))
            with graph.inserting_before(attn):
                mask = graph.call_function(cached_rows_mask, (mask, positions, hidden, tokens))
    _set_arg(attn, 3, "attn_mask", mask)
    _set_arg(attn, 5, "is_causal", False)


def _attend_compact(site: ResidualSite, attn: fx.Node, compact: list) -> bool:
    """A prefill (every cache's past part is empty, as the graph built it): the attention
    takes the routed layer's K rows per sequence (`compact`: (cache's cat, its new rows, its
    other parts)) instead of the cache's, so that its work is K x K, not K x T; the views
    between (repeat_kv's expand and reshape) are freed of the token count. False, with the
    graph as it was, where a past part may hold rows or the views cannot be freed."""
    if not all(isinstance(node_value(p), torch.Tensor) and node_value(p).numel() == 0 and
               p.op == "call_function" for _, _, others in compact for p in others):
        return False
    members = set(site.branch)
    paths = []
    for cat, rows, _ in compact:
        (i,) = [i for i in (1, 2) if cat in _within(attn.args[i], members)]
        paths.append((cat, rows, [n for n in site.branch if n in _within(attn.args[i], members)
                                  and n is not cat and n is not attn]))
    saved = {n: (n.args, n.kwargs) for _, _, path in paths for n in path + [attn]}
    try:
        for cat, rows, path in paths:
            for n in path + [attn]:
                n.replace_input_with(cat, rows)
            free_query_rows([rows] + path, 2)
    except RuntimeError:
        for n, (args, kwargs) in saved.items():
            n.args, n.kwargs = args, kwargs
        return False
    return True


def _follow(n: fx.Node, val, out, b, k):
    """The product of the sizes before the tokens in `n`'s output, its view/reshape given -1
    there; RuntimeError where the tokens cannot be followed."""
    if reshape_sizes(n) is not None:
        j = _query_axis(out.shape, b, k)
        given = reshape_sizes(n)
        sizes = [-1 if i == j else out.shape[i] if isinstance(x, int) and x == -1 else x
                 for i, x in enumerate(given)] if len(given) == out.dim() else \
            [-1 if i == j else x for i, x in enumerate(out.shape)]
        if j is None or not all(isinstance(x, (int, fx.Node)) for x in sizes):
            raise RuntimeError(f"{n.name}: cannot tell where the tokens go")
        n.args = (n.args[0], tuple(sizes))
        return b
    a = _query_axis(val.shape, b, k)
    moved = None
    if n.op == "call_method" and n.target == "transpose" or n.target is torch.transpose:
        d0, d1 = (int(x) % val.dim() for x in n.args[1:3])
        moved = d1 if a == d0 else d0 if a == d1 else a
    elif n.op == "call_method" and n.target == "permute" or n.target is torch.permute:
        moved = [int(x) % val.dim() for x in _sizes(n)].index(a) if a is not None else None
    elif out.dim() == val.dim() and a is not None and a < val.dim() - 1 and all(
            same_size(x, y) for x, y in zip(out.shape[:-1], val.shape[:-1])):  # linear, pointwise
        return b
    elif out.dim() == val.dim() and a is not None and a < val.dim() - 1 and \
            same_size(out.shape[a], k):  # expand
        if n.op == "call_method" and n.target == "expand":  # its sizes name the tokens
            sizes = list(_sizes(n))
            sizes[a] = -1
            n.args = (n.args[0], tuple(sizes))
        return math.prod(out.shape[:a]) if a else 1
    elif _adds_axes(n) and _query_axis(out.shape, b, k) is not None:  # x[:, :, None]
        return b
    if moved is None or a is None or not same_size(val.shape[a], k):
        raise RuntimeError(f"{n.name}: cannot follow the tokens through it")
    return math.prod(out.shape[:moved]) if moved else 1


def _sizes(n: fx.Node) -> tuple:
    """The sizes or dims of x.permute(...) / x.expand(...), given as a sequence or spread."""
    one = len(n.args) == 2 and isinstance(n.args[1], (tuple, list))
    return tuple(n.args[1]) if one else tuple(n.args[1:])


def _through_split(n: fx.Node, val, out) -> bool:
    """True if `n` splits its input along the features (or takes an item of such a split):
    the tokens stay where they were. False if neither side is a tuple; RuntimeError for any
    other tuple."""
    if not (isinstance(val, (tuple, list)) or isinstance(out, (tuple, list))):
        return False
    if not _splits_features(list(val) if isinstance(val, (tuple, list)) else [val],
                            list(out) if isinstance(out, (tuple, list)) else [out]):
        raise RuntimeError(f"{n.name}: cannot follow the tokens through it")
    return True


def _splits_features(ins: list, outs: list) -> bool:
    """Tensors in and out that differ in their last (feature) axis only: a split or chunk
    along it, or an item of one."""
    tensors = [t for t in ins + outs if isinstance(t, torch.Tensor)]
    return len(tensors) == len(ins) + len(outs) and all(
        t.dim() == tensors[0].dim() and all(same_size(x, y) for x, y in zip(
            t.shape[:-1], tensors[0].shape[:-1])) for t in tensors)


def _adds_axes(n: fx.Node) -> bool:
    """x.unsqueeze(d), or x[...] with only whole slices, None and Ellipsis: size-1 axes added,
    the elements' order kept."""
    if n.op == "call_method" and n.target == "unsqueeze" or n.target is torch.unsqueeze:
        return True
    if n.op != "call_function" or n.target is not operator.getitem or len(n.args) != 2:
        return False
    index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None))
               for i in index)


ELEMENTWISE = {operator.mul, operator.add, operator.sub, operator.truediv, torch.mul,
               torch.add, torch.sub, torch.div}
ELEMENTWISE_METHODS = {"mul", "add", "sub", "div", "__mul__", "__add__", "__sub__",
                       "__truediv__", "__rmul__", "__radd__"}


def _select_side_inputs(graph: fx.Graph, n: fx.Node, members: set, before: dict, k,
                        pick) -> None:
    """In an elementwise op of the block, a tensor from outside it (RoPE's cos, sin) that
    holds a row per token on the axis the block's tokens broadcast against: its routed rows,
    `pick(a, axis, value of a, value of n)` (a node, inserted before n)."""
    if same_size(k, 1) or not (n.op == "call_function" and n.target in ELEMENTWISE or
                           n.op == "call_method" and n.target in ELEMENTWISE_METHODS):
        return
    carrier = next((a for a in n.all_input_nodes if a in before), None)
    val, out = node_value(carrier), node_value(n)
    axis = _query_axis(val.shape, before[carrier], k)
    for a in n.all_input_nodes:
        side = node_value(a)
        if a in members or a in before or not isinstance(side, torch.Tensor) or axis is None:
            continue
        at = axis - (out.dim() - side.dim())
        if at >= 0 and same_size(side.shape[at], k):
            with graph.inserting_before(n):
                rows = pick(a, at, side, out)
            n.args = fx.node.map_arg(n.args, lambda x, a=a, rows=rows: rows if x is a else x)


def routed_masks(graph: fx.Graph, site: ResidualSite, positions: fx.Node) -> None:
    """An encoder's block (or layer) run on its routed tokens alone (keys="selected", top-k
    routing: equally many per sequence, at `positions` [B, K]): each attention's padding mask
    (or bias) keeps the routed tokens' columns, and rows where it has one per query. The
    mask node itself is left as it is (other layers read it too)."""
    for attn in site.branch:
        if attn.op != "call_function" or attn.target not in ATTENTION[:2]:
            continue
        mask = node_arg(attn, 3, "attn_mask")
        if isinstance(mask, fx.Node):
            with graph.inserting_before(attn):
                _set_arg(attn, 3, "attn_mask",
                         graph.call_function(select_mask, (mask, positions)))


def _compact_mask(graph: fx.Graph, attn: fx.Node, index: fx.Node, k) -> None:
    """The attention of the routed tokens among themselves: a mask with a row and a column per
    token keeps the routed ones; is_causal stays right while there are no cached keys (the
    routed tokens attend in order) or one query. Cached keys with a mask or a causal block
    of several queries: RuntimeError (the layer's cache holds its own, fewer, tokens)."""
    mask = node_arg(attn, 3, "attn_mask")
    keys = node_value(attn.args[1]).shape[-2]
    fresh = same_size(keys, k)  # no cached keys
    if isinstance(mask, fx.Node):
        m = node_value(mask)
        if not fresh or m is None:
            raise RuntimeError("a mask over cached keys cannot be mapped onto the layer's own "
                               "cache")
        with graph.inserting_before(attn):
            for dim in (-2, -1):
                if not same_size(m.shape[dim], 1):
                    mask = graph.call_function(torch.index_select, (mask, m.dim() + dim, index))
        _set_arg(attn, 3, "attn_mask", mask)
    elif node_arg(attn, 5, "is_causal", False) and not fresh and not same_size(k, 1):
        raise RuntimeError("a causal attention of several queries over cached keys")
