"""kv_proj, prefill graphs: the cache's bases folded into the projections, computed in the graph.

After the attention fold (kv_proj.py), each layer of a projected cache still computes, per
head with basis P [d, r] and mean mu (zero when uncentered),

    k = (x W_k^T + b_k - mu_k) P_k             what the cache stores, [B, G, T, r]
    q P_k = (x W_q^T + b_q) P_k                the queries in their KV head's key basis
    v = (x W_v^T + b_v - mu_v) P_v
    y = merge_heads(A L_v P_v^T + mu_v) W_o^T + b_o

With W' = P^T W and b' = P^T (b - mu) per head, the projections write the r-wide heads
directly, and with W_o' = W_o blockdiag(P_v) and b_o' = b_o + W_o mu_v, o_proj reads them:
exact algebra, each projection doing r/d of its work. Keys and queries fold only where
nothing comes between their projection and the cache or the attention: not with RoPE, whose
rotation sits there (GPT-2 folds; Llama folds its values).

The projections are found by attention_sites.py (F.linear, or transformers' Conv1D: addmm with
W [in, out]); a fused one (GPT-2's c_attn: q, k and v side by side, then split) is rebuilt as
one projection whose folded parts have their r-wide columns.

Why in the graph and not as constants: the bases and means belong to the cache object the
model is called with and reach the graph as inputs. Weights folded at compile time would give
another cache's calls wrong answers without any error. Computing W' costs about as much as
projecting d r / (d - r) tokens, so a graph is folded only when it projects more tokens than
that (prefills, not decode steps).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from effc.compiler.graph_facts import hinted, node_value, run_node
from effc.passes.attention_sites import (MATMULS, Part, Projection, is_method, only_user,
                                         split_widths, strip_to, view_sizes)

@dataclasses.dataclass(frozen=True)
class Fold:
    """Replace `target` (the cache's store (heads - mu) P, or the queries' heads @ P) with the
    part's projection folded: r-wide heads. `basis` [n, d, r] and `mean` [n, 1, d] (or None)
    are the cache's placeholders, one per head of the part."""

    role: str
    part: Part
    target: fx.Node
    basis: fx.Node
    mean: fx.Node | None
    repeats: int = 1  # query heads per KV head: the basis repeated to each query head


def store_of(graph: fx.Graph, basis: fx.Node, mean: fx.Node | None, skip: tuple = ()
             ) -> tuple[fx.Node, fx.Node, fx.Node | None] | str:
    """(the cache's store `(heads - mu) @ P` of new keys or values with this basis, the heads
    it projects, the mean placeholder or None), else why not. `skip`: other products with
    the basis (the queries')."""
    placeholder = strip_to(basis)
    stores = [n for n in graph.nodes if n.op == "call_function" and n.target in MATMULS
              and n not in skip and strip_to(n.args[1]) is placeholder]
    if len(stores) != 1:
        return f"{len(stores)} places project new states with this basis"
    store = stores[0]
    x = store.args[0]
    if mean is None:
        return store, x, None
    if not (isinstance(x, fx.Node) and x.op == "call_function"
            and x.target in (torch.sub, operator.sub)
            and strip_to(x.args[1]) is strip_to(mean) and only_user(x) is store):
        return "the mean is not subtracted right before the projection"
    return store, x.args[0], strip_to(mean)


def worth_it(tokens: int, d: int, r: int) -> bool:
    """Folding costs about d r token-projections' work; it saves (d - r) per token."""
    return tokens * (d - r) > d * r


def _folded_block(graph: fx.Graph, fold: Fold, w: fx.Node, b: fx.Node | None, io: bool
                  ) -> tuple[fx.Node, fx.Node | None]:
    """(P^T W, P^T (b - mu)) per head of the part, in W's layout ([n r, in] or [in, n r])."""
    call = graph.call_function
    value = node_value(fold.part.proj.w)
    basis = graph.call_method("to", (strip_to(fold.basis),),
                              {"device": value.device, "dtype": value.dtype})
    if fold.repeats > 1:
        basis = call(torch.repeat_interleave, (basis,), {"repeats": fold.repeats, "dim": 0})
    n, d, r = (hinted(s) for s in node_value(fold.basis).shape)
    n *= fold.repeats
    # batched matmuls, not einsum: at these sizes einsum's own cost dominates (14-17 against
    # 9-14 us per block on a 2-core CPU), and a prefill computes a dozen blocks per layer
    if io:  # [in, n, d] -> [n, in, d] @ P -> [n, in, r] -> [in, n r]
        heads = graph.call_method("transpose", (graph.call_method("view", (w, (-1, n, d))), 0, 1))
        wf = graph.call_method("transpose", (call(torch.matmul, (heads, basis)), 0, 1))
        wf = graph.call_method("reshape", (wf, (-1, n * r)))
    else:  # P^T [n, r, d] @ [n, d, in] -> [n r, in]
        wf = call(torch.matmul, (graph.call_method("transpose", (basis, 1, 2)),
                                 graph.call_method("view", (w, (n, d, -1)))))
        wf = graph.call_method("reshape", (wf, (n * r, -1)))
    shift = None if b is None else graph.call_method("view", (b, (n, d)))
    if fold.mean is not None:
        mu = graph.call_method("reshape", (graph.call_method("to", (fold.mean,), {
            "device": value.device, "dtype": value.dtype}), (n, d)))
        shift = call(torch.neg, (mu,)) if shift is None else call(torch.sub, (shift, mu))
    bias = None if shift is None else graph.call_method("reshape", (call(torch.matmul, (
        graph.call_method("unsqueeze", (shift, 1)), basis)), (n * r,)))
    return wf, bias


def fold_in(graph: fx.Graph, folds: list[Fold]) -> None:
    """Each projection with folded parts rebuilt once, in place of the targets (see the
    module docstring); a fused projection's other parts read their columns as before."""
    by_call: dict[fx.Node, list[Fold]] = {}
    for fold in folds:
        by_call.setdefault(fold.part.proj.call, []).append(fold)
    for group in by_call.values():
        _rebuild(graph, group)


def _rebuild(graph: fx.Graph, group: list[Fold]) -> None:
    proj = group[0].part.proj
    call = graph.call_function
    fused = proj.out.users and all(is_method(u, "split") for u in proj.out.users)
    split = next(iter(proj.out.users)) if fused else None
    widths = split_widths(split) if fused else [group[0].part.stop]
    pieces = list(split.users) if fused else [group[0].part.columns]
    by_start = {f.part.start: f for f in group}
    starts = [sum(widths[:i]) for i in range(len(widths))]
    with graph.inserting_before(proj.call):
        ws, bs, new_widths = [], [], []
        for start, width in zip(starts, widths):
            fold = by_start.get(start)
            cols = slice(start, start + width)
            w = proj.w if not fused else call(operator.getitem, (
                proj.w, (slice(None), cols) if proj.io else cols))
            b = proj.b if not fused or proj.b is None else call(operator.getitem, (proj.b, cols))
            if fold is not None:
                w, b = _folded_block(graph, fold, w, b, proj.io)
                _, d, r = (hinted(s) for s in node_value(fold.basis).shape)
                width = width // d * r
            ws.append(w)
            bs.append(b)
            new_widths.append(width)
        w = call(torch.cat, (ws, 0 if not proj.io else 1)) if fused else ws[0]
        b = (call(torch.cat, (bs,)) if fused and proj.b is not None else bs[0] if not fused
             else None)
        if not proj.io:
            out = call(proj.call.target, (proj.x, w, b))
        else:
            new = call(torch.addmm, (b, proj.x, w)) if b is not None else call(torch.mm, (proj.x, w))
            out = new if proj.out is proj.call else graph.call_method(
                "view", (new, view_sizes(proj.out)[:-1] + (sum(new_widths),)))
        if fused:
            parts = call(torch.split, (out, new_widths), {"dim": -1})
        for piece in pieces:
            index = piece.args[1] if fused else 0
            new_piece = call(operator.getitem, (parts, index)) if fused else out
            fold = by_start.get(starts[index])
            if fold is None:
                piece.replace_all_uses_with(new_piece)
                continue
            r = hinted(node_value(fold.basis).shape[-1])
            heads = graph.call_method("reshape", (new_piece, fold.part.sizes[:-1] + (r,)))
            fold.target.replace_all_uses_with(graph.call_method("transpose", (heads, 1, 2)))


def fold_value_out(graph: fx.Graph, attn: fx.Node, proj: Projection, per_head_basis: fx.Node,
                   per_head_mean: fx.Node | None, heads: int, d: int, r: int) -> None:
    """o_proj with W_o' = W_o blockdiag(P) and b_o' = b_o + W_o mu, reading the r-wide
    attention output [B, H, T, r] with its heads merged."""
    call = graph.call_function
    w, b = proj.w, proj.b
    with graph.inserting_before(proj.call):
        if proj.io:  # P^T [h, r, d] @ [h, d, out] -> [h r, out]
            w3 = graph.call_method("view", (w, (heads, d, -1)))
            wf = graph.call_method("flatten", (call(torch.matmul, (graph.call_method(
                "transpose", (per_head_basis, 1, 2)), w3)), 0, 1))
        else:  # [h, out, d] @ P [h, d, r] -> [out, h, r] -> [out, h r]
            w3 = graph.call_method("transpose", (graph.call_method("view", (
                w, (-1, heads, d))), 0, 1))
            wf = graph.call_method("flatten", (graph.call_method("transpose", (call(
                torch.matmul, (w3, per_head_basis)), 0, 1)), -2))
        if per_head_mean is not None:
            mu = graph.call_method("reshape", (per_head_mean, (-1,)))
            shift = call(torch.matmul, (mu, w)) if proj.io else call(torch.mv, (w, mu))
            b = shift if b is None else call(torch.add, (b, shift))
        merged = graph.call_method("flatten", (graph.call_method("transpose", (attn, 1, 2)), -2))
        if proj.io:
            merged = graph.call_method("flatten", (merged, 0, -2))
            new = call(torch.addmm, (b, merged, wf)) if b is not None else call(torch.mm, (
                merged, wf))
        else:
            new = call(proj.call.target, (merged, wf, b))
    proj.call.replace_all_uses_with(new)


def freeze_derived(gm: fx.GraphModule, ctx, seeds: set[fx.Node]) -> int:
    """Evaluate now what the graph computes from parameters and the constants in `seeds`
    alone (the folded weights of bases that are compile-time constants, unlike a cache's),
    and make each such result a constant derived from its parameters (the stale-weight
    guard watches them). Returns how many constants replaced computations."""
    env: dict[fx.Node, object] = {}          # computed from weights and seeds alone
    sources: dict[fx.Node, set[str]] = {}    # the weights each value is derived from
    seeded = set(seeds)                      # values that read a seed
    with torch.no_grad():
        for n in gm.graph.nodes:
            name = ctx.facts.weight_name(n)
            if n in seeds:
                env[n], sources[n] = run_node(gm, n, env), set()
            elif name is not None:
                env[n], sources[n] = ctx.facts.weight_value(n), {name}
            elif (n.op in ("call_function", "call_method") and n.all_input_nodes
                  and all(i in env for i in n.all_input_nodes)):
                env[n] = run_node(gm, n, env)
                sources[n] = set().union(*(sources[i] for i in n.all_input_nodes))
                if any(i in seeded for i in n.all_input_nodes):
                    seeded.add(n)
    frozen = 0
    for n in [m for m in gm.graph.nodes if m in seeded and m not in seeds]:  # graph order
        if isinstance(env[n], torch.Tensor) and any(u not in env for u in n.users):
            const = ctx.add_constant(gm, env[n], derived_from=sorted(sources[n]),
                                     name_hint=n.name)
            n.replace_all_uses_with(const)
            frozen += 1
    return frozen
