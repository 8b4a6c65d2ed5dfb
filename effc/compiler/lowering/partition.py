"""The partitioner: which FX nodes become one generated kernel.

Three kinds of group (DESIGN.md, Lowering):
- `gemm`: a GEMM-like op (effc's `low_rank_linear`, `phm_linear` and `shift_linear`, or a
  dense `linear`) and the pointwise epilogue computed on its output tile. effc's ops are kept
  even alone (their template is what the op runs on CUDA anyway). A dense linear is kept only
  when it has an epilogue that computes something: alone (bias included), a library call
  (cuBLAS/oneDNN) is faster than a generic Triton template, and fusing saves nothing, so it
  stays eager;
- `row`: row reductions over the last dim (mean/sum/amax keepdim, softmax, layer_norm,
  rms_norm) with their pointwise prologue and epilogue, one row held in registers;
- `pointwise`: a chain of elementwise ops that all have the group's output shape (inputs
  may broadcast to it), and `cat`s: a cat operand's producers, of the operand's shape, join
  when the group holds all their users (the kernel recomputes them in the operand's index
  range; they are never stored), so `q * cos + cat((-q2, q1)) * sin` is one kernel.

Groups grow by merging neighbours over a networkx quotient graph (one vertex per group,
one per node left eager). Two groups merge only if no path between them runs through a third
vertex: then contracting them keeps the graph acyclic, so the fused graph can be ordered.
A topological order of the quotient is kept through the merges, so that check searches only
the vertices placed between the two (linear time overall in practice: a 32-layer Llama graph
partitions in 0.09 s, 0.87 s with a whole-graph path search per merge;
benchmarks/bench_lowering.py --part d).
Row groups grow first (a norm's prologue is worth more than a GEMM epilogue), then GEMM
epilogues, then pointwise chains. A node with a user outside its group, or that the graph
returns, is an output of the group and stays materialized.

In-place writes (`nn.ReLU(inplace=True)`, `out += identity`, `y.masked_fill_(...)`): the
data edges above do not order a write against other reads of the tensor, so `partition`
first rewrites, in the graph it is given, each write that is safe to compute out of place.
`m = y.op_(...)` is safe when:
- effc knows its out-of-place twin (`ops.out_of_place`) and the twin keeps y's dtype and
  shape (y floating point; other tensor operands of y's dtype, broadcasting into y);
- y is fresh: made in this graph by an op whose result is always a new tensor
  (`ops.returns_fresh`: not an input, attribute, view, cast, dropout or unknown op; topk's
  and sort's values and indices are fresh, so an MoE router's `w /= w.sum(...)` fuses);
- every other reader of y ordered before the write returns a fresh tensor (or none) and
  writes nothing: no alias of y exists that would see the write.
Readers of y after the write are then pointed at m (in eager, m *is* y) and m becomes the
out-of-place op: y is never written, and m can join groups. Every other write (into an
input, a view, a tensor an alias was taken of, `out=`, `x[i] = v`) is a barrier: it stays
eager and cuts the graph into segments; a group never spans two, and as a launcher sits
after its group's last node, no kernel moves a read or write across a barrier. Identity and
cast nodes that may alias a tensor a barrier writes are not fused either: a kernel would
return a copy where eager returns the tensor itself, which later sees the write.
"""

from __future__ import annotations

import dataclasses
import itertools

import networkx as nx
import sympy
import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from effc.compiler.graph_facts import node_value
from effc.compiler.lowering.ops import (FLOAT_DTYPES, LIBRARY_GEMMS, Op, classify, meta, mutates,
                               out_of_place, returns_fresh)

_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Group:
    """Nodes computed by one kernel. `shape` is the full output shape ([*rows, N] for `row`)."""

    kind: str
    nodes: list[fx.Node]
    shape: tuple[sympy.Expr, ...]
    ops: dict[fx.Node, Op]
    inputs: list[fx.Node] = dataclasses.field(default_factory=list)   # tensors the kernel reads
    outputs: list[fx.Node] = dataclasses.field(default_factory=list)
    # other nodes the group's nodes name (a SymInt in a layer_norm's normalized_shape): the
    # eager fallback needs them, the kernel does not
    extra_deps: list[fx.Node] = dataclasses.field(default_factory=list)
    id: int = dataclasses.field(default_factory=lambda: next(_ids))

    @property
    def reduced_shape(self) -> tuple[sympy.Expr, ...]:
        return self.shape[:-1] + (sympy.Integer(1),)

    @property
    def gemm(self) -> fx.Node | None:
        return next((n for n in self.nodes if self.ops[n].kind == "gemm"), None)

    def describe(self) -> str:
        return ", ".join(n.name for n in self.nodes)

    def kernel_name(self) -> str:
        """What the kernel computes: `fused_mul_add_gelu`, `row_rmsnorm`, `low_rank_linear_silu_mul`,
        `phm_linear_gelu`."""
        parts: list[str] = []
        square = False
        gemm = self.gemm
        for n in self.nodes:
            op = self.ops[n]
            if n is gemm:
                continue
            name = op.name
            if name in ("identity", "cast"):
                continue
            if name == "pow":
                square = op.params["exponent"] == 2
            if name == "mul" and len(op.nodes) == 2 and op.nodes[0] is op.nodes[1]:
                square = True
            if self.kind == "row" and square and name == "rsqrt" and "mean" in parts:
                cut = max(i for i, p in enumerate(parts) if p in ("pow", "mul"))
                parts = parts[:cut] + ["rmsnorm"]
                square = False
                continue
            if parts and parts[-1] == "rmsnorm" and name == "mul":
                continue  # x * rsqrt(...) and the weight: part of the norm
            name = {"layer_norm": "layernorm", "rms_norm": "rmsnorm"}.get(name, name)
            if not parts or parts[-1] != name:
                parts.append(name)
        if gemm is not None:
            act = self.ops[gemm].params.get("activation", "none")
            parts = ([act] if act != "none" else []) + parts
            return "_".join([self.ops[gemm].name] + parts[:5])
        prefix = "row" if self.kind == "row" else "fused"
        return "_".join([prefix] + parts[:6]) + (f"_{len(parts) - 6}more" if len(parts) > 6 else "")


@dataclasses.dataclass
class Partition:
    """The groups of a graph, in graph order; in-place ops rewritten out of place
    (`functionalized`, node names) and those left eager as barriers (node name, why)."""

    groups: list[Group]
    functionalized: list[str] = dataclasses.field(default_factory=list)
    barriers: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def fused_nodes(self) -> int:
        return sum(len(g.nodes) for g in self.groups)


def _is_noop(op: Op, node: fx.Node) -> bool:
    if op.name == "identity":
        return True
    src = meta(op.operands[0]) if op.name == "cast" else None
    return src is not None and src[1] == meta(node)[1]


def _bare_library_gemm(group: Group) -> bool:
    """A dense linear with nothing (or only no-op casts) fused: better left to the library."""
    gemm = group.gemm
    return (gemm is not None and group.ops[gemm].name in LIBRARY_GEMMS
            and all(_is_noop(group.ops[n], n) for n in group.nodes if n is not gemm))


class _Builder:
    """Grows groups by contracting vertices of a quotient graph that stays a DAG."""

    def __init__(self, nodes: list[fx.Node], ops: dict[fx.Node, Op],
                 segment: dict[fx.Node, int]):
        self.order = {n: i for i, n in enumerate(nodes)}
        self.segment = segment
        self.ops = ops
        self.dag = nx.DiGraph()
        self.dag.add_nodes_from(nodes)
        self.dag.add_edges_from((n, u) for n in nodes for u in n.users)
        self.group_of: dict[fx.Node, Group] = {}
        for n, op in ops.items():
            shape = meta(n)[0] if op.kind != "reduction" else meta(op.operands[0])[0]
            kind = {"reduction": "row"}.get(op.kind, op.kind)
            self.group_of[n] = Group(kind, [n], shape, {n: op})
        self.quotient = nx.relabel_nodes(self.dag, self.group_of, copy=True)
        self._ancestors: dict[fx.Node, set[fx.Node]] = {}
        # a topological order of the quotient, kept valid through every merge: a path between
        # two vertices only runs through vertices placed between them, so a cycle check and
        # the order's update look at that window, not the whole graph (a merged vertex leaves
        # a None in its old place, so no other position moves)
        self.seq: list = [self.vertex(n) for n in nodes]
        self.pos: dict[object, int] = {v: i for i, v in enumerate(self.seq)}

    def vertex(self, n: fx.Node) -> object:
        return self.group_of.get(n, n)

    # --- when two groups may merge --------------------------------------------------------
    def _combine(self, a: Group, b: Group) -> tuple[str, tuple] | None:
        """(kind, shape) of a ∪ b, or None if no kernel kind computes both."""
        if self.segment[a.nodes[0]] != self.segment[b.nodes[0]]:
            return None  # an in-place barrier lies between them
        kinds = {a.kind, b.kind}
        if kinds == {"pointwise"}:
            if a.shape == b.shape:
                return "pointwise", a.shape
            shape = next((g.shape for g in (a, b) if _cat_operands_only(a.nodes + b.nodes,
                                                                         g.shape, self.ops)), None)
            return ("pointwise", shape) if shape is not None else None
        if any(g.ops[n].name == "cat" for g in (a, b) for n in g.nodes):
            return None  # only the pointwise generator computes cat
        if "gemm" in kinds:
            if kinds != {"gemm", "pointwise"} or a.shape != b.shape:
                return None
            gemm_group, other = (a, b) if a.kind == "gemm" else (b, a)
            ancestors = self._gemm_ancestors(gemm_group.gemm)
            if any(n in ancestors for n in other.nodes):
                return None  # a prologue: the template reads x as it is in memory
            return "gemm", a.shape
        rows = [g for g in (a, b) if g.kind == "row"]
        full = rows[0].shape
        if any(g.shape != full for g in rows):
            return None
        reduced = rows[0].reduced_shape
        if any(g.kind == "pointwise" and g.shape not in (full, reduced) for g in (a, b)):
            return None
        return "row", full

    def _gemm_ancestors(self, node: fx.Node) -> set[fx.Node]:
        if node not in self._ancestors:
            self._ancestors[node] = nx.ancestors(self.dag, node)
        return self._ancestors[node]

    def _reached_between(self, first: object, last: object) -> set | None:
        """The vertices placed between `first` and `last` that `first` reaches, or None if one
        of them has an edge to `last`: a path through a third vertex, which contracting the
        two would close into a cycle. (Every such path lies between them in the order.)"""
        limit, seen, stack = self.pos[last], set(), [first]
        while stack:
            v = stack.pop()
            for s in self.quotient.successors(v):
                if s is last:
                    if v is not first:
                        return None
                elif s not in seen and self.pos[s] < limit:
                    seen.add(s)
                    stack.append(s)
        return seen

    def try_merge(self, a: Group, b: Group) -> Group | None:
        """Merge b into a if a kernel computes both and the quotient stays acyclic."""
        if a is b:
            return a
        combined = self._combine(a, b)
        if combined is None:
            return None
        first, last = (a, b) if self.pos[a] < self.pos[b] else (b, a)
        reached = self._reached_between(first, last)
        if reached is None:
            return None
        nx.contracted_nodes(self.quotient, a, b, self_loops=False, copy=False)
        # the merged vertex goes after what it does not reach and before what it does; the
        # window's vertices keep their relative order (that keeps the order topological)
        lo, hi = self.pos[first], self.pos[last]
        window = [v for v in self.seq[lo + 1:hi] if v is not None]
        placed = [v for v in window if v not in reached] + [a] + [v for v in window if v in reached]
        placed += [None] * (hi - lo + 1 - len(placed))
        self.seq[lo:hi + 1] = placed
        for i, v in enumerate(placed, lo):
            if v is not None:
                self.pos[v] = i
        del self.pos[b]
        a.kind, a.shape = combined
        a.nodes = sorted(a.nodes + b.nodes, key=self.order.__getitem__)
        a.ops.update(b.ops)
        for n in b.nodes:
            self.group_of[n] = a
        return a

    # --- growth ---------------------------------------------------------------------------
    def grow(self, seed: fx.Node, backward: bool) -> None:
        """Merge neighbours (users; operands too if `backward`) into seed's group until none fits."""
        group = self.group_of[seed]
        tried: set[fx.Node] = set()
        while True:
            frontier = []
            for n in group.nodes:
                near = list(n.users) + (self.ops[n].nodes if backward else [])
                frontier += [m for m in near if m in self.ops and m not in tried
                             and self.group_of[m] is not group]
            if not frontier:
                return
            for m in sorted(set(frontier), key=self.order.__getitem__):
                tried.add(m)
                merged = self.try_merge(group, self.group_of[m])
                if merged is not None:
                    break  # the group changed: recompute its frontier

    def run(self) -> list[Group]:
        by_kind = lambda kind: [n for n in self.order if n in self.ops and self.ops[n].kind == kind]
        for n in by_kind("reduction"):
            self.grow(n, backward=True)
        for n in by_kind("gemm"):
            self.grow(n, backward=True)
        for n in by_kind("pointwise"):
            self.grow(n, backward=True)
        # the invariant every merge kept: the order is topological, so the fused graph is acyclic
        if any(self.pos[u] >= self.pos[v] for u, v in self.quotient.edges):
            raise AssertionError("effc partitioner: fused graph has a cycle")
        groups = {id(g): g for g in self.group_of.values()}.values()
        return sorted(groups, key=lambda g: self.order[g.nodes[0]])


def _cat_operands_only(nodes: list[fx.Node], shape: tuple, ops: dict[fx.Node, Op]) -> bool:
    """Whether one pointwise kernel of output `shape` computes `nodes`: a node of another shape
    (a cat operand's producer) is computed only in that operand's index range and never
    stored, so each of its users is in the group and is a cat reading it or a node of its own
    shape (computed in the same range)."""
    members = set(nodes)
    for n in nodes:
        own = meta(n)[0]
        if own == shape:
            continue
        if not n.users:
            return False  # nothing reads it: no cat would compute it
        for u in n.users:
            if u not in members or (meta(u)[0] != own and not (ops[u].name == "cat"
                                                              and n in ops[u].operands)):
                return False
    return True


def _finish(group: Group) -> Group:
    members = set(group.nodes)
    for n in group.nodes:
        for a in group.ops[n].nodes:
            if a not in members and a not in group.inputs:
                group.inputs.append(a)
    group.outputs = [n for n in group.nodes if any(u not in members for u in n.users)]
    group.extra_deps = list(dict.fromkeys(a for n in group.nodes for a in n.all_input_nodes
                                          if a not in members and a not in group.inputs))
    return group


def _holds_tensor(node: fx.Node) -> bool:
    val = node_value(node)
    if val is None:
        return node.meta.get("tensor_meta") is not None
    return any(isinstance(v, torch.Tensor) for v in tree_leaves(val))


def _broadcasts_into(shape: tuple, into: tuple) -> bool:
    return len(shape) <= len(into) and all(d == 1 or d == e for d, e in zip(reversed(shape),
                                                                              reversed(into)))


def _why_eager(m: fx.Node, order: dict[fx.Node, int]) -> str | None:
    """Why in-place m cannot be computed out of place (None: it can; see the module docstring)."""
    twin = out_of_place(m)
    if twin is None:
        return "effc knows no out-of-place form of it"
    y = m.args[0]
    if not isinstance(y, fx.Node) or meta(y) is None:
        return "it writes into something that is not a tensor computed in this graph"
    if y.op == "placeholder":
        return f"it writes into the graph input `{y.name}`, which the caller sees"
    if y.op == "get_attr":
        return f"it writes into the module attribute `{y.target}`"
    if not returns_fresh(y):
        return (f"it writes into `{y.name}`, which may share memory with another tensor "
                "(a view, an input, or an op effc does not know)")
    shape, dtype, _ = meta(y)
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        return f"it writes into a {dtype} tensor"
    target, args, kwargs = twin
    masked = target in ("masked_fill", torch.masked_fill)
    for i, a in enumerate(list(args[1:]) + list(kwargs.values())):
        am = meta(a)
        if isinstance(a, fx.Node) and am is None:
            if not isinstance(node_value(a), (int, float, torch.SymInt, torch.SymFloat)):
                return f"it reads `{a.name}`, which effc cannot check"
        elif am is not None:
            if am[1] != dtype and not (masked and i == 0) or not _broadcasts_into(am[0], shape):
                return "its out-of-place form would have another dtype or shape"
        elif not (a is None or isinstance(a, (bool, int, float, str))):
            return f"it takes an argument effc cannot check ({a!r})"
    for u in y.users:
        if u is not m and order[u] < order[m] and (mutates(u) or
                                                   (_holds_tensor(u) and not returns_fresh(u))):
            return f"`{u.name}` reads `{y.name}` before the write and may alias it"
    return None


def _functionalize(nodes: list[fx.Node]) -> tuple[list[str], list[tuple[fx.Node, str]]]:
    """Rewrite safe in-place nodes out of place, in graph order (a rewritten node's result is
    fresh, so an in-place op on it may be rewritten too). Returns (rewritten, barriers)."""
    order = {n: i for i, n in enumerate(nodes)}
    rewritten, barriers = [], []
    for m in nodes:
        if not mutates(m):
            continue
        why = _why_eager(m, order)
        if why is not None:
            barriers.append((m, why))
            continue
        target, args, kwargs = out_of_place(m)
        y = m.args[0]
        for u in list(y.users):
            if u is not m and order[u] > order[m]:
                u.replace_input_with(y, m)  # eager: m is y, holding the written value
        m.target, m.args, m.kwargs = target, args, kwargs
        rewritten.append(m.name)
    return rewritten, barriers


def _aliases_of_written(nodes: list[fx.Node],
                        barriers: list[tuple[fx.Node, str]]) -> set[fx.Node]:
    """Nodes that may share memory with a tensor a barrier writes (union-find over every node
    whose result may alias its inputs; graph inputs may alias one another)."""
    parent: dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    for n in nodes:
        if n.op.startswith("call") and not returns_fresh(n):
            for a in n.all_input_nodes:
                parent[find(a)] = find(n)
    written = {find(a) for m, _ in barriers for a in [m, *m.all_input_nodes]}
    inputs = {find(n) for n in nodes if n.op in ("placeholder", "get_attr")}
    if written & inputs:
        written |= inputs
    return {n for n in nodes if find(n) in written}


KINDS = ("gemm", "row", "pointwise")


def partition(graph: fx.Graph, kinds: tuple[str, ...] = KINDS) -> Partition:
    """Fusable groups of `graph` (nodes need shape metadata: Dynamo's, or ShapeProp's), of the
    kernel `kinds` given. Without "gemm" or "row", GEMMs or row reductions are left out before
    groups form (their epilogues and prologues may still make pointwise kernels); without
    "pointwise", pointwise ops still join GEMM and row kernels, only pointwise kernels go.

    Rewrites safe in-place ops in `graph` out of place (module docstring): pass a copy if the
    graph must stay as it is.
    """
    functionalized, barriers = _functionalize(list(graph.nodes))
    nodes = list(graph.nodes)
    segment, cuts, k = {}, {m for m, _ in barriers}, 0
    for n in nodes:  # segment k: the nodes after the k-th barrier
        segment[n] = k
        k += n in cuts
    aliased = _aliases_of_written(nodes, barriers) if barriers else set()
    ops = {n: op for n in nodes if (op := classify(n)) is not None and not mutates(n)
           and not (n in aliased and op.name in ("identity", "cast"))
           and {"reduction": "row"}.get(op.kind, op.kind) in kinds + ("pointwise",)}
    groups = [_finish(g) for g in _Builder(nodes, ops, segment).run()]
    kept = [g for g in groups if not all(_is_noop(g.ops[n], n) for n in g.nodes)
            and not _bare_library_gemm(g) and g.kind in kinds]
    reasons = [(m.name, f"writes in place and stays eager: {why}; no kernel moves a read or "
                        "write across it") for m, why in barriers]
    return Partition(kept, functionalized, reasons)
