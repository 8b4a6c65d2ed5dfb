"""The `verify` option: run the original and the rewritten graph on the example inputs.

Each graph gets its own clones of the non-weight tensor inputs, so a graph that mutates an
input (a KV-cache update) cannot leak into the other run.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from effc.compiler.graph_facts import GraphFacts, fqn_from_source
from effc.compiler.metrics import error_stats


def _fresh_inputs(facts: GraphFacts) -> list[Any]:
    return [gi.value.clone() if gi.kind == "input" and isinstance(gi.value, torch.Tensor)
            else gi.value for gi in facts.inputs]


def output_names(gm: torch.fx.GraphModule, facts: GraphFacts) -> list[str]:
    """A name per output leaf of `gm`: the variable Dynamo traced it from (`logits`, `keys_1`).

    Dynamo rebuilds the model's output object (a ModelOutput, a cache) outside the graph, so
    the graph knows its outputs only by the names of the values it computed; an output that
    is a graph input (a cache tensor passed through) is named after that input.
    """
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves, _ = pytree.tree_flatten(out.args[0])
    names, seen = [], collections.Counter()
    for i, leaf in enumerate(leaves):
        gi = facts.input_of(leaf)
        if gi is not None:
            name = gi.name if gi.kind in ("parameter", "buffer") else fqn_from_source(gi.name)
        elif isinstance(leaf, torch.fx.Node):
            name = leaf.name
        else:
            name = f"output {i} (constant)"
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def verify_outputs(original: torch.fx.GraphModule, rewritten: Callable, facts: GraphFacts
                   ) -> list[dict[str, Any]]:
    """Per output: max_abs, rel_fro, cosine, sqnr_db of rewritten vs original (floats), or the
    fraction of elements that agree exactly (integers, bools)."""
    with torch.no_grad():
        ref = pytree.tree_leaves(original(*_fresh_inputs(facts)))
        out = pytree.tree_leaves(rewritten(*_fresh_inputs(facts)))
    if len(ref) != len(out):
        raise RuntimeError(f"rewritten graph returns {len(out)} values, original {len(ref)}")
    names = output_names(original, facts)
    if len(names) != len(ref):
        names = [str(i) for i in range(len(ref))]
    rows = []
    for name, r, o in zip(names, ref, out):
        if isinstance(r, torch.Tensor) and r.is_floating_point():
            rows.append({"output": name, **error_stats(r, o)})
        elif isinstance(r, torch.Tensor):
            same = r.shape == o.shape
            agree = (r == o).double().mean().item() if same and r.numel() else float(same)
            rows.append({"output": name, "agreement": agree, "exact": agree == 1.0})
        else:
            rows.append({"output": name, "agreement": float(r == o), "exact": bool(r == o)})
    return rows
