"""What every pass needs to know about the FX graph Dynamo hands effc.

Dynamo lifts parameters and buffers into the graph as placeholders whose example inputs are
the `nn.Parameter` objects themselves; `node.meta["grapharg"].source` names the module path.
`GraphFacts` maps each placeholder to a `GraphInput` (kind, readable fully-qualified name,
example value) so passes can ask "is this argument a weight, and which one?".
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import operator
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.fx as fx
try:  # torch >= 2.12; torch 2.11 and older (an H200 machine had 2.11) call it hint_int
    from torch.fx.experimental.symbolic_shapes import optimization_hint as _size_hint
except ImportError:  # pragma: no cover - depends on the installed torch
    from torch.fx.experimental.symbolic_shapes import hint_int as _size_hint

InputKind = Literal["parameter", "buffer", "input", "symint"]

_ROOT = re.compile(r"^([LG])\['([^']*)'\]")
_TOKEN = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]"  # nn.Module dicts
                    r"|\.([A-Za-z_]\w*|\d+)"                         # attribute, or a
                    # child's index as nn_module_stack spells it (`.layers.0.self_attn`)
                    r"|\[(?:'([^']*)'|(\d+))\]")                       # key or index


def split_source(source_name: str) -> tuple[str, str] | None:
    """`L['args'][0]._modules['model']._parameters['weight']` -> (`L['args'][0]`, `model.weight`).

    The root is the object the path starts from: a local (`L['self']`, `L['args'][0]` when a
    decorator wraps forward as `wrapper(*args, **kwargs)`, `L['kwargs']['model']`, a closure
    variable `L['enc']`) or a global (`G['encoder']`), with the `[...]` selectors that follow
    it. The path is what `root.named_parameters()` calls the tensor. None if unparsable.
    """
    m = _ROOT.match(source_name)
    if not m:
        return None
    pos, root_end, parts = m.end(), m.end(), []
    while pos < len(source_name):
        t = _TOKEN.match(source_name, pos)
        if not t:
            return None
        if not parts and (t.group(3) is not None or t.group(4) is not None):
            root_end = t.end()  # L['args'][0], L['kwargs']['model']: still naming the root
        else:
            parts.append(next(g for g in t.groups() if g is not None))
        pos = t.end()
    return source_name[:root_end], ".".join(parts)


def root_label(root: str) -> str:
    """A readable prefix for a root: its last key (`L['args'][0]` -> `0`, `G['enc']` -> `enc`)."""
    keys = re.findall(r"\[(?:'([^']*)'|(\d+))\]", root)
    return next(g for g in keys[-1] if g) if keys else root


def fqn_from_source(source_name: str) -> str:
    """`L['self']._modules['model']._parameters['weight']` -> `model.weight`.

    A local root is dropped whatever Dynamo calls it (`L['self']`, `L['args'][0]`, a keyword,
    a closure variable), so names equal `model.named_parameters()`; a global root
    (`G['encoder']`, a module a compiled function reads from module scope) is kept as a prefix.
    Unparsable text (a source kind this does not know) is returned unchanged.
    """
    split = split_source(source_name)
    if split is None:
        return source_name
    root, path = split
    if root.startswith("G"):
        return f"{root_label(root)}.{path}" if path else root_label(root)
    return path or root_label(root)


@dataclasses.dataclass(frozen=True)
class GraphInput:
    """One placeholder: its position in the calling convention, kind, name and example."""

    index: int
    node_name: str
    kind: InputKind
    name: str
    value: Any


def _kind(source_name: str, value: Any) -> InputKind:
    if isinstance(value, (torch.SymInt, int, float, bool)) and not isinstance(value, torch.Tensor):
        return "symint"
    if isinstance(value, torch.nn.Parameter) or "._parameters[" in source_name:
        return "parameter"
    if "._buffers[" in source_name:
        return "buffer"
    return "input"


def caller_root() -> torch.nn.Module | None:
    """The module whose call led to this compile, found on the call stack, or None.

    The outermost `nn.Module.__call__` frame is the model the user called (a
    `torch.compile`d module is unwrapped to the original). Its `named_parameters()` name
    every weight it owns, whichever frame Dynamo is compiling: after a graph break inside a
    submodule, Dynamo compiles that submodule's frame, whose sources start at the submodule
    (`L['self']` is the rotary embedding), so source paths alone would drop the prefix.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    root, frame = None, sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_call_impl" and frame.f_code.co_filename.endswith(
                _MODULE_FILE):
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, torch.nn.Module):
                root = candidate
        frame = frame.f_back
    while isinstance(root, OptimizedModule):
        root = root._orig_mod
    return root


_MODULE_FILE = os.path.join("torch", "nn", "modules", "module.py")


def _root_names(root: torch.nn.Module | None) -> dict[int, str]:
    """id(tensor) -> its name in `root` (parameters and buffers, first name of tied ones)."""
    if root is None:
        return {}
    names = {}
    for name, t in list(root.named_parameters()) + list(root.named_buffers()):
        names.setdefault(id(t), name)
    return names


def _weight_names(sources: list[str]) -> dict[str, str]:
    """source -> name for a graph's weights: `fqn_from_source`, unless two roots collide.

    A function that calls two modules (`dec(enc(x))`) reads weights from two local roots
    whose paths can be equal (`fc.weight` in both); those are then prefixed with their root
    (`enc.fc.weight`, `dec.fc.weight`) so that every weight keeps a name of its own.
    """
    names = {s: fqn_from_source(s) for s in sources}
    roots: dict[str, set[str]] = {}
    for s, name in names.items():
        split = split_source(s)
        roots.setdefault(name, set()).add(split[0] if split else s)
    for s, name in names.items():
        split = split_source(s)
        if split is not None and len(roots[name]) > 1 and not split[0].startswith("G"):
            names[s] = f"{root_label(split[0])}.{name}"
    return names


class GraphFacts:
    """Placeholders of a Dynamo graph, classified and named; stable across graph copies."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any],
                 root: torch.nn.Module | None | str = "caller"):
        """`root`: the model whose named_parameters() name the weights ("caller": the module
        whose call led to this compile, see caller_root; None: source paths alone)."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise ValueError(f"graph has {len(placeholders)} placeholders but "
                             f"{len(example_inputs)} example inputs were given")
        sources = []
        for node, value in zip(placeholders, example_inputs):
            grapharg = node.meta.get("grapharg")
            source = grapharg.source.name if grapharg is not None else node.name
            sources.append((source, _kind(source, value)))
        names = _weight_names([s for s, k in sources if k in ("parameter", "buffer")])
        owned = _root_names(caller_root() if root == "caller" else root)
        self.inputs: list[GraphInput] = []
        for i, (node, value, (source, kind)) in enumerate(zip(placeholders, example_inputs,
                                                               sources)):
            if kind in ("parameter", "buffer"):
                name = owned.get(id(value), names[source])
            else:
                name = source
            self.inputs.append(GraphInput(i, node.name, kind, name, value))
        self._by_node = {gi.node_name: gi for gi in self.inputs}
        self.weights = {gi.name: gi for gi in self.inputs if gi.kind in ("parameter", "buffer")}

    def input_of(self, node: Any) -> GraphInput | None:
        """The GraphInput behind `node` if it is a placeholder, else None."""
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self._by_node.get(node.name)
        return None

    def weight_name(self, node: Any) -> str | None:
        """Fully-qualified parameter/buffer name if `node` is a lifted weight, else None."""
        gi = self.input_of(node)
        return gi.name if gi is not None and gi.kind in ("parameter", "buffer") else None

    def weight_value(self, node: Any) -> torch.Tensor | None:
        """The real tensor behind a weight placeholder (compile-time value), else None."""
        gi = self.input_of(node)
        return gi.value if gi is not None and gi.kind in ("parameter", "buffer") else None

    def fresh(self, args: Sequence[Any] | None = None) -> list[Any]:
        """`args` (default: the example inputs) with the non-weight tensors cloned, so that a
        graph that writes into an input (a KV-cache update) cannot change it for a later run,
        and sizes concrete (a graph traced dynamic gets its example call's sizes as SymInts,
        which running it cannot take)."""
        values = [gi.value for gi in self.inputs] if args is None else args
        return [a.clone() if isinstance(a, torch.Tensor) and gi.kind == "input" else hinted(a)
                for a, gi in zip(values, self.inputs)]

    def describe(self) -> dict[str, int]:
        """Counts per kind, and parameter elements, for the report."""
        out: dict[str, int] = {k: 0 for k in ("parameter", "buffer", "input", "symint")}
        for gi in self.inputs:
            out[gi.kind] += 1
        out["parameter_elements"] = sum(gi.value.numel() for gi in self.inputs
                                        if gi.kind == "parameter")
        return out


def is_transpose(node: Any) -> bool:
    """`node` swaps the two dims of a 2-D tensor: `W.T`, `W.mT`, `W.t()`, `W.transpose(0, 1)`."""
    if not isinstance(node, fx.Node) or not node.args:
        return False
    t, args = node.target, node.args
    if node.op == "call_function" and t is getattr:
        return args[1] in ("T", "mT")
    if (node.op, t) in (("call_method", "t"), ("call_function", torch.t)):
        return len(args) == 1
    if (node.op, t) in (("call_method", "transpose"), ("call_function", torch.transpose)):
        return len(args) == 3 and {args[1], args[2]} in ({0, 1}, {-1, -2}, {0, -1}, {-2, 1})
    return False


def hinted(value: Any) -> Any:
    """A SymInt (a size of a graph traced dynamic) as its hint, the example call's int;
    anything else as it is."""
    return _size_hint(value) if isinstance(value, torch.SymInt) else value


def graph_device(example_inputs: Sequence[Any]) -> torch.device:
    """Device of the first accelerator tensor input, else CPU: a GPU model's graph can take CPU
    tensors too (Dynamo lifts small CPU tensors as inputs), and they may come first."""
    devices = [t.device for t in example_inputs if isinstance(t, torch.Tensor)]
    return next((d for d in devices if d.type != "cpu"), torch.device("cpu"))


def matches(name: str, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> bool:
    """True if `name` passes the glob filters: some include matches (or none given), no exclude.

    A pattern also matches the owning module: `*.mlp.*` and `layers.0.mlp` both select
    `layers.0.mlp.down_proj.weight`.
    """
    def hit(pattern: str) -> bool:
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")

    include, exclude = list(include), list(exclude)
    return (not include or any(map(hit, include))) and not any(map(hit, exclude))


def node_arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """A call's argument by position `i`, else by keyword `name`, else `default`."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def node_value(node: fx.Node) -> Any:
    """The fake value FX/Dynamo recorded for `node` (`val` or Dynamo's `example_value`)."""
    return node.meta.get("val", node.meta.get("example_value"))


# Meta key of a node whose number of rows is data-dependent (token_skip's routed rows): its
# fake value is the unrouted node's, so shapes must not be read from it (the Triton lowering
# leaves such nodes to eager).
ROWS_VARY = "effc_rows_vary"


def copy_node_meta(dst: fx.Node, src: fx.Node) -> None:
    """Give a node that replaces `src` (same value) src's fake value and provenance."""
    for key in ("val", "example_value", "tensor_meta", "stack_trace", "nn_module_stack",
                ROWS_VARY):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def node_shape(node: fx.Node) -> tuple[Any, ...] | None:
    """Shape of a tensor-valued node; entries may be SymInts under dynamic shapes."""
    val = node_value(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def node_dtype(node: fx.Node) -> torch.dtype | None:
    val = node_value(node)
    return val.dtype if isinstance(val, torch.Tensor) else None


def is_static(size: Any) -> bool:
    """A size a pass may bake into the graph: an int, or a SymInt Dynamo specialized to one."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return is_concrete_int(size)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A structural copy: new graph and nodes (meta copied shallowly), tensors shared.

    This is the snapshot a rolled-back pass returns to; it never copies weight values.
    """
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    old_output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    new_output = next(n for n in reversed(graph.nodes) if n.op == "output")
    new_output.meta = copy.copy(old_output.meta)
    new_gm = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new_gm.meta = copy.copy(getattr(gm, "meta", {}))
    return new_gm


def add_constant(gm: fx.GraphModule, tensor: torch.Tensor, name_hint: str) -> fx.Node:
    """Register `tensor` as a buffer of `gm` under a fresh name and return a get_attr node for it.

    The node is placed after the placeholders, so any later node may use it.
    """
    base = "_effc_" + re.sub(r"\W", "_", name_hint).strip("_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor.detach(), persistent=False)
    first = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    with gm.graph.inserting_before(first):
        node = gm.graph.get_attr(name)
    node.meta["val"] = torch.empty_like(tensor, device="meta")
    return node


class ValueCapture(fx.Interpreter):
    """Runs a graph and keeps the values of the nodes named in `wanted` (detached)."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out.detach()
        return out


def run_node(gm: fx.GraphModule, node: fx.Node, env: dict, swap: dict | None = None) -> Any:
    """Execute one node with values from `env` (`swap`: node -> value overrides)."""
    def value(n: fx.Node) -> Any:
        return swap[n] if swap and n in swap else env[n]

    args = fx.node.map_arg(node.args, value)
    kwargs = fx.node.map_arg(node.kwargs, value)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    raise RuntimeError(f"cannot execute node {node.name} ({node.op})")


def _mutates(node: fx.Node) -> bool:
    """Whether a node writes into a tensor in place (x.index_copy_(...), x[i] = y, an op
    with a mutable schema): FX's default dead-code test keeps only some of these."""
    if node.is_impure():
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        return (node.target is operator.setitem
                or getattr(node.target, "__name__", "").endswith("_")
                or (schema is not None and schema.is_mutable))
    return False


def remove_dead_code(graph: fx.Graph) -> None:
    """graph.eliminate_dead_code(), keeping every in-place write: a static KV cache's
    `keys.index_copy_(...)` has no users, yet the next call reads what it wrote."""
    graph.eliminate_dead_code(is_impure_node=_mutates)
