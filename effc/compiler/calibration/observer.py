"""The observer backend behind `effc.calibrate`: Dynamo's graph plus recording calls at sites.

Calibration observes the very FX graphs effc compiles (same placeholders, same GraphFacts
names), not module hooks, so the names it records are the names passes look up. The backend
inserts calls to plain functions of this module next to each site; they write into the
`Session` that `recording()` made active, and do nothing outside it.

One module-level backend object on purpose: Dynamo caches compiled graphs per code object and
guards on the backend's identity, so a fresh backend per `calibrate` call would recompile every
time and, past the recompile limit, run the model eagerly (for every backend, effc's too). A
cached observer graph records into whichever session is active, so every batch is recorded.
Every kind of site is instrumented; the session's `what` decides at run time what is recorded.
Likewise the padding mask: `calibrate` puts each batch's [B, T] mask of real tokens on the
session, and the recording functions select those tokens at run time, so cached graphs serve
padded and unpadded batches alike.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from effc.compiler.graph_facts import GraphFacts, copy_graph_module, is_transpose, node_arg

LINEAR = torch._C._nn.linear
MATMULS = (torch.matmul, operator.matmul, torch.mm)
CONVS = (torch.conv1d, torch.conv2d)
SDPA = torch._C._nn.scaled_dot_product_attention
SOFTMAXES = (F.softmax, torch.softmax)
ADDS = (operator.add, torch.add, operator.iadd)
PASSTHROUGH_METHODS = {"view", "reshape", "contiguous", "to", "type", "float", "type_as"}
PASSTHROUGH_FUNCTIONS = {F.dropout, torch.reshape}
_BLOCK = 1 << 22  # elements converted to float64 at once: bounds the transient memory
_SEARCH_DEPTH = 16  # hops from an attention's key back to its projection


@dataclasses.dataclass
class Session:
    """One `calibrate` run: where statistics go, what is recorded, how many graphs ran."""

    calibration: Any  # effc.compiler.calibration.Calibration
    what: frozenset[str]
    attention_maps: int = 4
    samples: int = 4  # graph inputs kept per graph, for passes that measure end-to-end effects
    graph_calls: int = 0
    in_sample: bool = False  # the running graph call is one kept as a sample
    mask: torch.Tensor | None = None  # this batch's [B, T] bool mask of real tokens, if padded

    def mask_on(self, device: torch.device) -> torch.Tensor:
        """The mask on `device`, moved once per batch rather than once per site."""
        if self.mask.device != device:
            self.mask = self.mask.to(device)
        return self.mask


_ACTIVE: Session | None = None


@contextlib.contextmanager
def recording(session: Session) -> Iterator[Session]:
    """Make `session` the target of every observer graph for the duration of the block."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("effc.calibrate is already running (calibrate calls do not nest)")
    _ACTIVE = session
    try:
        yield session
    finally:
        _ACTIVE = None


def _wanted(kind: str) -> Session | None:
    s = _ACTIVE
    return s if s is not None and kind in s.what else None


# --- recording functions: called from the observer graphs -----------------------------------
def observe_graph(names: tuple[str, ...], notes: tuple[str, ...], n_weights: int,
                  *tensors: Any) -> None:
    """Start of a graph: count it, record the shapes of its weights and its skipped sites, and
    keep its first few non-weight inputs (`samples`) so passes can run the graph on them."""
    s = _ACTIVE
    if s is None:
        return
    s.graph_calls += 1
    weights, inputs = tensors[:n_weights], tensors[n_weights:]
    for name, w in zip(names, weights):
        s.calibration.weight_shapes[name] = tuple(w.shape)
    for text in notes:
        s.calibration.note(text)
    s.in_sample = False
    if s.samples:
        s.in_sample = s.calibration.add_sample(graph_key(names), inputs, s.samples)


def graph_key(weight_names: Sequence[str]) -> str:
    """Which graph a sample belongs to: a hash of its weight names in placeholder order (the
    observer and effc see the same Dynamo graph, so they agree on it)."""
    return hashlib.sha1("\n".join(weight_names).encode()).hexdigest()[:16]


def observe_input(x: torch.Tensor, w: torch.Tensor, key: str, kind: str,
                  conv: tuple = (), sources: tuple[torch.Tensor, ...] = ()) -> None:
    """Add x x^T of a site's input rows (conv: unfolded patches) to the moment of weight `key`.

    `sources` are the tensors x was reshaped/cast from: a [B*T, K] x flattened from a
    [B, T, K] one has token-major rows, so the padding mask applies to it too.
    """
    s = _wanted("inputs")
    if s is None:
        return
    if kind == "conv":
        _unmasked(s, key)
        blocks = patch_rows(x, w, *conv)
    else:
        rows = _token_rows(s, x, key, sources)
        if rows is None:
            rows = x.reshape(-1, w.shape[-1] if kind == "linear" else w.shape[0])
        blocks = rows.split(max(1, _BLOCK // max(rows.shape[1], 1)))
    for block in blocks:
        s.calibration.add_input(key, block, sample=s.in_sample)


def observe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: str,
                      attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                      scale: float | None = None, kv_features: int = 0) -> None:
    """At scaled_dot_product_attention: per-head K/V moments, and a sampled attention map.

    `kv_features` is the key projection's output width: it tells K/V heads that grouped-query
    attention repeated to the query heads (HF does when it passes a mask) from real ones.
    """
    s = _ACTIVE
    if s is None:
        return
    if "kv" in s.what and k.dim() == 4 and v.dim() == 4:
        k, v = _kv_heads(k, kv_features), _kv_heads(v, kv_features)
        if s.mask is not None:
            bt = tuple(s.mask.shape)
            if (k.shape[0], k.shape[2]) == bt == (v.shape[0], v.shape[2]):  # [B, H, T, D]
                m = s.mask_on(k.device)  # [N, H, D] -> [1, H, N, D]: N real tokens
                k, v = (t.transpose(1, 2)[m].transpose(0, 1).unsqueeze(0) for t in (k, v))
            else:
                _unmasked(s, key)
        s.calibration.add_heads("keys", key, k)
        s.calibration.add_heads("values", key, v)
    if "attention" in s.what and len(s.calibration.attention.get(key, ())) < s.attention_maps:
        s.calibration.add_attention_map(key, _attention_probs(q, k, attn_mask, is_causal, scale),
                                        s.attention_maps)


def observe_probs(probs: torch.Tensor, key: str) -> None:
    """After an eager attention's softmax: keep the first sample's map, up to the limit."""
    s = _wanted("attention")
    if s is not None and probs.dim() == 4:
        s.calibration.add_attention_map(key, probs[0], s.attention_maps)


def observe_residual(stream: torch.Tensor, update: torch.Tensor, key: str) -> None:
    """At `stream + update`: per-token norms of the branch's update against the stream."""
    s = _wanted("residuals")
    if s is not None and stream.shape == update.shape:
        if s.mask is not None:
            if stream.shape[:-1] == s.mask.shape:
                m = s.mask_on(stream.device)
                stream, update = stream[m], update[m]
            else:
                _unmasked(s, key)
        s.calibration.add_residual(key, stream, update)


def _kv_heads(t: torch.Tensor, features: int) -> torch.Tensor:
    """[B, H, T, D] back to its G = features / D key/value heads if each was repeated H / G
    times (repeat_kv's order), so masked and unmasked batches record the same heads."""
    h, d = t.shape[1], t.shape[3]
    g = features // d
    if not features or features % d or g >= h or h % g:
        return t
    grouped = t.unflatten(1, (g, h // g))  # [B, G, n, T, D]: head g*n + j repeats head g
    return t[:, ::h // g] if torch.equal(grouped, grouped[:, :, :1].expand_as(grouped)) else t


def _token_rows(s: Session, x: torch.Tensor, key: str, sources: tuple[torch.Tensor, ...]
                ) -> torch.Tensor | None:
    """x's rows at real tokens ([N, K]), or None: no mask this batch, or (noted) none fits.

    Matched only where the layout is known: x is [B, T, K], or x is [B*T, K] reshaped from a
    [B, T, K] source (reshapes keep row-major order, so row b*T + t is token (b, t)).
    """
    if s.mask is None:
        return None
    mask = s.mask
    if x.shape[:-1] == mask.shape:
        return x[s.mask_on(x.device)]
    if x.dim() == 2 and any(isinstance(t, torch.Tensor) and t.shape[:-1] == mask.shape
                            and t.shape[-1] == x.shape[-1] for t in sources):
        return x[s.mask_on(x.device).reshape(-1)]
    _unmasked(s, key)
    return None


def _unmasked(s: Session, key: str) -> None:
    """Note (once per site) that padding is counted at a site whose layout the mask misses."""
    if s.mask is not None:
        s.calibration.note(f"{key}: token mask not applied (the site's tensor is not laid out "
                           f"as [batch, tokens, ...] like the mask): all its rows count, "
                           f"padding included if it has any")


def _pair(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def patch_rows(x: torch.Tensor, w: torch.Tensor, stride: Any, padding: Any,
                dilation: Any) -> Iterator[torch.Tensor]:
    """The conv's input patches as [N, C_in*k...] rows (weight.reshape(C_out, -1) order)."""
    dims = w.dim() - 2
    kernel, stride, dilation = tuple(w.shape[2:]), _pair(stride, dims), _pair(dilation, dims)
    if x.dim() == dims + 1:
        x = x.unsqueeze(0)  # unbatched input
    if padding == "valid":
        pads = [(0, 0)] * dims
    elif padding == "same":  # as torch pads it: the odd element goes to the end
        pads = [((d * (k - 1)) // 2, d * (k - 1) - (d * (k - 1)) // 2)
                for k, d in zip(kernel, dilation)]
    else:
        pads = [(p, p) for p in _pair(padding, dims)]
    if dims == 1:  # a 1-d conv is a 2-d conv over a height-1 image
        x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
        pads = [(0, 0), *pads]
    x = F.pad(x, [p for pair in reversed(pads) for p in pair])
    k = w.shape[1] * math.prod(kernel)
    positions = math.prod((n - d * (kk - 1) - 1) // s + 1
                          for n, kk, s, d in zip(x.shape[2:], kernel, stride, dilation))
    per_chunk = max(1, _BLOCK // max(k * positions, 1))
    for chunk in x.split(per_chunk):
        patches = F.unfold(chunk, kernel, dilation=dilation, stride=stride)  # [b, K, L]
        yield patches.transpose(1, 2).reshape(-1, k)


def _attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                     is_causal: bool, scale: float | None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) of the batch's first sample, [H, Tq, Tk], in float32."""
    q0, k0 = q[0].float(), k[0].float()
    if k0.shape[0] != q0.shape[0]:  # grouped-query attention: each key head serves a group
        k0 = k0.repeat_interleave(q0.shape[0] // k0.shape[0], dim=0)
    scores = q0 @ k0.transpose(-1, -2) * (scale if scale is not None else q0.shape[-1] ** -0.5)
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        m = torch.broadcast_to(mask, (q.shape[0], *scores.shape))[0]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    return scores.softmax(dim=-1)


# --- finding sites ---------------------------------------------------------------------------
def input_site(node: fx.Node, facts: GraphFacts) -> tuple | str | None:
    """(x, weight node, weight name, kind, conv args) for a linear/conv site; a str says why a
    weight call is not one; None for any other node."""
    if node.op != "call_function":
        return None
    t = node.target
    if t is LINEAR:
        x, w, kind = node_arg(node, 0, "input"), node_arg(node, 1, "weight"), "linear"
    elif t is torch.addmm:
        x, w, kind = node_arg(node, 1, "mat1"), node_arg(node, 2, "mat2"), "x@W"
    elif t in MATMULS:
        x, w, kind = node_arg(node, 0, "input"), node_arg(node, 1, "other"), "x@W"
        if is_transpose(w) and facts.weight_name(w.args[0]) is not None:
            w, kind = w.args[0], "linear"  # x @ W.T
    elif t in CONVS:
        x, w, kind = node_arg(node, 0, "input"), node_arg(node, 1, "weight"), "conv"
    else:
        return None
    name = facts.weight_name(w)
    if name is None or not isinstance(x, fx.Node) or facts.weight_name(x) is not None:
        return None
    if kind == "x@W" and facts.weight_value(w).dim() != 2:
        return None
    conv = ()
    if kind == "conv":
        groups = node_arg(node, 6, "groups", 1)
        conv = (node_arg(node, 3, "stride", 1), node_arg(node, 4, "padding", 0),
                node_arg(node, 5, "dilation", 1))
        if groups != 1:
            return f"{name}: grouped conv (groups={groups}) not recorded"
        computed: list[fx.Node] = []
        fx.node.map_arg(conv, computed.append)
        if computed:
            return f"{name}: conv with run-time stride/padding/dilation not recorded"
    return x, w, name, kind, conv


def _through_passthrough(node: Any) -> Any:
    """Follow view/reshape/dropout/dtype casts back to the node that computed the values."""
    while _is_passthrough(node):
        node = node.args[0]
    return node


def _passthrough_chain(node: Any) -> tuple[fx.Node, ...]:
    """The nodes `node` was viewed/reshaped/cast from, nearest first (its value's sources)."""
    chain = []
    while _is_passthrough(node):
        node = node.args[0]
        chain.append(node)
    return tuple(n for n in chain if isinstance(n, fx.Node))


def _is_passthrough(node: Any) -> bool:
    return isinstance(node, fx.Node) and bool(node.args) and (
        (node.op == "call_method" and node.target in PASSTHROUGH_METHODS)
        or (node.op == "call_function" and node.target in PASSTHROUGH_FUNCTIONS))


def _feeds_matmul(node: fx.Node) -> bool:
    """True if `node` (a softmax) reaches a matmul as its left operand through casts/dropout:
    the probabilities of an eager attention."""
    frontier = [node]
    for _ in range(4):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.op == "call_function" and u.target in MATMULS and u.args[0] is n:
                    return True
                if _is_passthrough(u) and u.args[0] is n:
                    nxt.append(u)
        frontier = nxt
    return False


def _projection_behind(node: fx.Node, sites: dict[fx.Node, str], facts: GraphFacts) -> str | None:
    """Weight of the nearest site feeding `node`, not searching past other weight users (norms)
    so that the search never wanders into an earlier layer."""
    seen, queue = {node}, collections.deque([(node, 0)])
    while queue:
        n, depth = queue.popleft()
        if n in sites:
            return sites[n]
        if depth >= _SEARCH_DEPTH or any(facts.weight_name(a) for a in n.all_input_nodes):
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                queue.append((a, depth + 1))
    return None


def _is_ancestor(a: fx.Node, b: fx.Node, order: dict[fx.Node, int]) -> bool:
    """True if `b` is computed from `a`: the branch reads the stream it is added back to (and a
    GELU's `x + c * x**3` is not a residual). Nodes before `a` in the graph cannot lead to it."""
    seen, stack = {b}, [b]
    while stack:
        n = stack.pop()
        if n is a:
            return True
        for p in n.all_input_nodes:
            if p not in seen and order.get(p, -1) >= order[a]:
                seen.add(p)
                stack.append(p)
    return False


def _residual(node: fx.Node, sites: dict[fx.Node, str], order: dict[fx.Node, int]
              ) -> tuple[fx.Node, fx.Node, str] | None:
    """(stream, update, weight) if `node` is `stream + update` where the update is a site's
    output (through views/dropout) computed from the stream: a residual branch's add."""
    if not (node.op == "call_function" and node.target in ADDS and len(node.args) == 2
            and all(isinstance(a, fx.Node) for a in node.args)):
        return None
    sources = [_through_passthrough(a) for a in node.args]
    behind = [sites.get(n) for n in sources]
    if (behind[0] is None) == (behind[1] is None):  # exactly one operand is a branch
        return None
    u = 0 if behind[0] is not None else 1
    stream = node.args[1 - u]
    return (stream, node.args[u], behind[u]) if _is_ancestor(stream, sources[u], order) else None


def module_of(weight_name: str) -> str:
    """`model.layers.0.self_attn.k_proj.weight` -> `model.layers.0.self_attn`."""
    return weight_name.rsplit(".", 2)[0] if weight_name.count(".") >= 2 else weight_name


def _insert(graph: fx.Graph, where: fx.Node, fn: Any, args: tuple, kwargs: dict | None = None,
            after: bool = False) -> None:
    with (graph.inserting_after(where) if after else graph.inserting_before(where)):
        graph.call_function(fn, args, kwargs or {})


def instrument(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """A copy of `gm` with recording calls at every site; its outputs are `gm`'s outputs."""
    observed = copy_graph_module(gm)
    facts = GraphFacts(observed, example_inputs)
    graph = observed.graph
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    notes: list[str] = []
    sites: dict[fx.Node, str] = {}
    widths: dict[str, int] = {}  # site weight -> output features
    for node in nodes:
        site = input_site(node, facts)
        if isinstance(site, str):
            notes.append(site)
        elif site is not None:
            x, w, name, kind, conv = site
            sites[node] = name
            shape = facts.weight_value(w).shape
            widths[name] = shape[1] if kind == "x@W" else shape[0]
            _insert(graph, node, observe_input,
                    (x, w, name, kind, conv, () if kind == "conv" else _passthrough_chain(x)))
    for node in nodes:
        if node.op == "call_function" and node.target is SDPA:
            q, k, v = (node_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
            proj = _projection_behind(k, sites, facts)
            if proj is None:
                notes.append(f"attention at graph node {node.name}: no key projection found, "
                             f"K/V and maps not recorded")
                continue
            _insert(graph, node, observe_attention, (q, k, v, module_of(proj)),
                    {"attn_mask": node_arg(node, 3, "attn_mask"),
                     "is_causal": node_arg(node, 5, "is_causal", False),
                     "scale": node.kwargs.get("scale"), "kv_features": widths[proj]})
        elif node.op == "call_function" and node.target in SOFTMAXES and _feeds_matmul(node):
            proj = _projection_behind(node.args[0], sites, facts)
            if proj is not None:
                _insert(graph, node, observe_probs, (node, module_of(proj)), after=True)
        elif residual := _residual(node, sites, order):
            _insert(graph, node, observe_residual, residual)
    weights = [n for n in nodes if facts.weight_name(n) is not None]
    inputs = [n for n in nodes if n.op == "placeholder" and facts.weight_name(n) is None]
    first = next(n for n in graph.nodes if n.op != "placeholder")
    _insert(graph, first, observe_graph,
            (tuple(facts.weight_name(n) for n in weights), tuple(notes), len(weights), *weights,
             *inputs))
    observed.recompile()
    return observed


def observer_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    """The Dynamo backend `calibrate` compiles with: run the instrumented graph eagerly."""
    return instrument(gm, example_inputs).forward
