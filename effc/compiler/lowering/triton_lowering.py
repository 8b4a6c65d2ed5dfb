"""`lowering="triton"`: partition the rewritten graph, generate a kernel per group, splice.

Each group's nodes are replaced by one call to its launcher (getitem nodes pick its outputs);
the graph is then re-ordered topologically, since a group's outputs may be used by nodes that
came between its members. A group whose code cannot be generated or loaded keeps its nodes and
is reported with the reason (or raises under `strict`). On CPU the kernels run under the Triton
interpreter, which must be switched on (TRITON_INTERPRET=1) before triton is imported.
"""

from __future__ import annotations

import heapq
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from effc.compiler.lowering.codegen import build, generate
from effc.compiler.lowering.codegen.cache import source_hash
from effc.compiler.lowering.codegen.launch import Launcher
from effc.compiler.config import Config
from effc.compiler.graph_facts import copy_graph_module, node_value
from effc.compiler.lowering.graph_rewrites import drop_empty_cat_operands, unflatten_gemms
from effc.compiler.lowering.partition import Group, partition
from effc.compiler.report import FallbackRecord, GraphReport, KernelRecord


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def unavailable_reason(example_inputs: Sequence[Any], grad_enabled: bool) -> str | None:
    """Why this graph cannot run generated kernels at all (None: it can)."""
    if not triton_available():
        return "the `triton` package is not importable"
    if grad_enabled and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        return ("grad mode is on and inputs require grad: generated kernels have no backward "
                "(call the compiled model under torch.no_grad() or torch.inference_mode())")
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    if devices - {"cuda", "cpu"} or len(devices) > 1:
        return f"tensors on {sorted(devices)}: generated kernels run on one CUDA device or the CPU"
    if devices == {"cpu"} and os.environ.get("TRITON_INTERPRET") != "1":
        return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
                "triton is imported")
    return None


def _ensure_meta(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Shape metadata for graphs not traced by Dynamo (hand-built FX graphs in tests). A Dynamo
    graph has fake values on its nodes (none on a call returning None, such as torch's API
    logging): running it here would run the whole model once more."""
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    if any(node_value(n) is not None for n in calls) or all("tensor_meta" in n.meta
                                                             for n in calls):
        return
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)


def _replace(gm: fx.GraphModule, group: Group, launcher: Any,
             replaced: dict[fx.Node, fx.Node]) -> None:
    """Swap the group's nodes for one launcher call; outside users read its outputs.

    `replaced` maps outputs of groups replaced earlier to the nodes that now hold them.
    """
    graph, members = gm.graph, set(group.nodes)
    with graph.inserting_after(group.nodes[-1]):
        args = group.inputs + group.extra_deps
        call = graph.call_function(launcher, tuple(replaced.get(n, n) for n in args))
    vals = [node_value(n) for n in group.outputs]
    if len(group.outputs) == 1:
        call.meta["val"] = vals[0]
        results = [call]
    else:
        call.meta["val"] = tuple(vals)
        results = []
        for i, val in enumerate(vals):
            with graph.inserting_after(results[-1] if results else call):
                item = graph.call_function(operator.getitem, (call, i))
            item.meta["val"] = val
            results.append(item)
    for out, new in zip(group.outputs, results):
        out.replace_all_uses_with(new, delete_user_cb=lambda user: user not in members)
        replaced[out] = new
    for n in reversed(group.nodes):
        graph.erase_node(n)


def _toposort(graph: fx.Graph) -> None:
    """Re-order nodes so every use follows its definition, keeping the old order otherwise."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    waiting = {n: len(n.all_input_nodes) for n in nodes}
    ready = [(index[n], n.name) for n in nodes if waiting[n] == 0]
    by_name = {n.name: n for n in nodes}
    heapq.heapify(ready)
    order = []
    while ready:
        node = by_name[heapq.heappop(ready)[1]]
        order.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (index[user], user.name))
    if len(order) != len(nodes):
        raise AssertionError("effc triton lowering: the fused graph has a cycle")
    if order == nodes:
        return
    nodes[0].prepend(order[0])
    for before, after in zip(order, order[1:]):
        before.append(after)


# what the ops left to eager are, for the report (anything else: "no kernel for it")
_LIBRARY_OPS = {"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "conv1d", "conv2d",
                "scaled_dot_product_attention", "embedding"}
_SHAPE_OPS = {"view", "reshape", "transpose", "permute", "getitem", "getattr", "unsqueeze",
              "squeeze", "expand", "expand_as", "view_as", "contiguous", "split", "chunk",
              "flatten", "unflatten", "t", "narrow", "select", "unbind", "size", "dim"}


def eager_ops(gm: fx.GraphModule) -> dict[str, dict[str, int]]:
    """The calls of the lowered graph that are not kernels, counted by op name in four kinds:
    library calls (GEMMs, attention, embedding: no template, or nothing to fuse), views and
    shape ops (no data moved), ops on non-float values, and float ops no kernel computes."""
    found: dict[str, dict[str, int]] = {"library": {}, "views": {}, "non-float": {}, "other": {}}
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or isinstance(n.target, Launcher):
            continue
        if n.target is operator.getitem and isinstance(getattr(n.args[0], "target", None),
                                                       Launcher):
            continue  # a kernel's output
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        value = node_value(n)
        if not isinstance(value, (torch.Tensor, tuple, list)):
            continue  # no tensor: a size, a logging call
        kind = ("library" if name in _LIBRARY_OPS else "views" if name in _SHAPE_OPS else
                "other" if isinstance(value, torch.Tensor) and value.is_floating_point() else
                "non-float")
        found[kind][name] = found[kind].get(name, 0) + 1
    return {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in found.items() if v}


def kernel_target(example_inputs: Sequence[Any]) -> str:
    """`cuda` for CUDA tensors with compiled kernels (GEMM templates autotuned), else
    `interpreter` (TRITON_INTERPRET=1: one fixed tile config)."""
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    cuda = devices == {"cuda"} and os.environ.get("TRITON_INTERPRET") != "1"
    return "cuda" if cuda else "interpreter"


class _Notes:
    """Runtime fallbacks go to the report once per (kernel, reason).

    The dumper wrote report.json/report.md when the graph was compiled, before any kernel ran;
    with a debug folder, a runtime fallback rewrites both so they show it too.
    """

    def __init__(self, report: GraphReport, kernel: str, nodes: list[str],
                 folder: Path | None = None):
        self.report, self.kernel, self.nodes, self.folder = report, kernel, nodes, folder
        self.seen: set[str] = set()

    def __call__(self, reason: str) -> None:
        if reason not in self.seen:
            self.seen.add(reason)
            self.report.fallbacks.append(FallbackRecord(self.nodes, f"at run time: {reason}",
                                                        self.kernel))
            if self.folder is not None and self.folder.is_dir():
                from effc.compiler.dumper import write_report

                try:
                    write_report(self.folder, self.report)
                except OSError as exc:  # a debug file is never worth failing a model call
                    self.report.notes.append(f"report files not rewritten: {exc}")


def lower_triton(gm: fx.GraphModule, example_inputs: Sequence[Any], config: Config,
                 report: GraphReport, grad_enabled: bool) -> tuple[fx.GraphModule, dict[str, str]]:
    """(the graph with groups replaced by kernel calls, kernel file stem -> source)."""
    gm = copy_graph_module(gm)
    why = unavailable_reason(example_inputs, grad_enabled)
    if why is not None:
        if config.strict and config.lowering == "triton":  # "auto" just means: where it can
            raise RuntimeError(f"effc lowering='triton': {why}")
        report.fallbacks.append(FallbackRecord(["(whole graph)"], why))
        return gm, {}
    _ensure_meta(gm, example_inputs)
    # GPT-2's Conv1D: x.view(-1, K) @ W, viewed back (only worth it if GEMM kernels are on)
    unflattened = unflatten_gemms(gm.graph) if "gemm" in config.kernels else []
    emptied = drop_empty_cat_operands(gm.graph)  # the KV cache's first cat([tensor([]), k])
    parts = partition(gm.graph, config.kernels)  # rewrites safe in-place ops out of place
    for name, why in parts.barriers:  # eager ops like any other: not an error under strict
        report.fallbacks.append(FallbackRecord([name], why))
    if parts.functionalized:
        n = len(parts.functionalized)
        report.notes.append(f"{n} in-place op{'s' * (n != 1)} computed out of place (nothing "
                            "else reads the tensors written): " + ", ".join(parts.functionalized))
    if unflattened:
        n = len(unflattened)
        report.notes.append(f"{n} GEMM{'s' * (n != 1)} on a flattened input computed on the "
                            "input itself, so the epilogue fuses (views "
                            + ", ".join(unflattened) + ")")
    if emptied:
        report.notes.append(f"legacy empty operands dropped from {len(emptied)} cat"
                            f"{'s' * (len(emptied) != 1)}: " + ", ".join(emptied))
    target = kernel_target(example_inputs)
    folder = Path(config.debug_dir) / report.graph if config.debug_dir is not None else None
    sources: dict[str, str] = {}
    stems: dict[str, str] = {}  # source hash -> file stem, unique within this graph
    built = []  # every launcher is built (and its eager subgraph copied) before the graph changes
    for group in parts.groups:
        nodes = [n.name for n in group.nodes]
        try:
            source = generate(group, target)
            key = source_hash(source.text)
            stem = stems.get(key)
            if stem is None:
                stem, i = source.name, 0
                while stem in sources:
                    i += 1
                    stem = f"{source.name}_{i}"
                stems[key] = stem
            launcher = build(group, source, cache_dir=config.cache_dir, strict=config.strict,
                             notify=_Notes(report, source.name, nodes, folder))
        except Exception as exc:
            if config.strict:
                raise
            report.fallbacks.append(FallbackRecord(nodes, f"{type(exc).__name__}: {exc}"))
            continue
        sources[stem] = source.text
        report.kernels.append(KernelRecord(source.name, group.kind, nodes,
                                           [n.name for n in group.outputs], f"{stem}.py", key))
        built.append((group, launcher))
    replaced: dict[fx.Node, fx.Node] = {}
    for group, launcher in built:
        _replace(gm, group, launcher, replaced)
    _toposort(gm.graph)
    gm.graph.lint()
    gm.recompile()
    report.eager_ops = eager_ops(gm)
    return gm, sources

