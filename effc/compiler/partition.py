"""The partitioner: which FX nodes become one generated kernel.

Three kinds of group (DESIGN.md, Lowering):
- `gemm`: a GEMM-like op (effc's `low_rank_linear`, or a dense `linear`) and the pointwise
  epilogue computed on its output tile. A dense linear is kept only when it has an epilogue
  that computes something: alone (bias included), a library call (cuBLAS/oneDNN) is faster
  than a generic Triton template, and fusing saves nothing, so it stays eager;
- `row`: row reductions over the last dim (mean/sum/amax keepdim, softmax, layer_norm,
  rms_norm) with their pointwise prologue and epilogue, one row held in registers;
- `pointwise`: a chain of elementwise ops that all have the group's output shape (inputs
  may broadcast to it).

Groups grow by merging neighbours over a networkx quotient graph (one vertex per group,
one per node left eager). Two groups merge only if no path between them runs through a third
vertex: then contracting them keeps the graph acyclic, so the fused graph can be ordered.
Row groups grow first (a norm's prologue is worth more than a GEMM epilogue), then GEMM
epilogues, then pointwise chains. A node with a user outside its group, or that the graph
returns, is an output of the group and stays materialized.
"""

from __future__ import annotations

import dataclasses
import itertools

import networkx as nx
import sympy
import torch.fx as fx

from effc.compiler.ops import LIBRARY_GEMMS, Op, classify, meta, mutates

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
        """What the kernel computes: `fused_mul_add_gelu`, `row_rmsnorm`, `low_rank_linear_silu_mul`."""
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
    """The groups of a graph, in graph order; `refused` says why a graph got none at all."""

    groups: list[Group]
    refused: str | None = None

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

    def __init__(self, nodes: list[fx.Node], ops: dict[fx.Node, Op]):
        self.order = {n: i for i, n in enumerate(nodes)}
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

    def vertex(self, n: fx.Node) -> object:
        return self.group_of.get(n, n)

    # --- when two groups may merge --------------------------------------------------------
    def _combine(self, a: Group, b: Group) -> tuple[str, tuple] | None:
        """(kind, shape) of a ∪ b, or None if no kernel kind computes both."""
        kinds = {a.kind, b.kind}
        if kinds == {"pointwise"}:
            return ("pointwise", a.shape) if a.shape == b.shape else None
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

    def _indirect_path(self, src: object, dst: object) -> bool:
        """A path src -> ... -> dst through some third vertex (contracting would close a cycle)."""
        return any(s is not dst and nx.has_path(self.quotient, s, dst)
                   for s in self.quotient.successors(src))

    def try_merge(self, a: Group, b: Group) -> Group | None:
        """Merge b into a if a kernel computes both and the quotient stays acyclic."""
        if a is b:
            return a
        combined = self._combine(a, b)
        if combined is None or self._indirect_path(a, b) or self._indirect_path(b, a):
            return None
        nx.contracted_nodes(self.quotient, a, b, self_loops=False, copy=False)
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
        if not nx.is_directed_acyclic_graph(self.quotient):  # the invariant every merge kept
            raise AssertionError("effc partitioner: fused graph has a cycle")
        groups = {id(g): g for g in self.group_of.values()}.values()
        return sorted(groups, key=lambda g: self.order[g.nodes[0]])


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


def partition(graph: fx.Graph) -> Partition:
    """Fusable groups of `graph` (nodes need shape metadata: Dynamo's, or ShapeProp's)."""
    nodes = list(graph.nodes)
    mutating = next((n for n in nodes if mutates(n)), None)
    if mutating is not None:
        return Partition([], f"the graph writes a tensor in place ({mutating.format_node()}); "
                             "moving reads and writes across it is not modelled, so it runs eagerly")
    ops = {n: op for n in nodes if (op := classify(n)) is not None}
    groups = [_finish(g) for g in _Builder(nodes, ops).run()]
    kept = [g for g in groups if not all(_is_noop(g.ops[n], n) for n in g.nodes)
            and not _bare_library_gemm(g)]
    return Partition(kept)
