"""Verification: what the rewritten model computes against what the original computes.

The `verify` option runs the original and the rewritten graph on the example inputs, per
graph. Each graph gets its own clones of the non-weight tensor inputs, so a graph that
mutates an input (a KV-cache update) cannot leak into the other run. `effc.verify(model,
...)` compares whole model calls, with every output named by its path in the model's output
(`logits`, `cache.0.keys`), which a graph alone cannot know.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from effc.compiler.graph_facts import GraphFacts, fqn_from_source
from effc.compiler.metrics import error_stats


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
        ref = pytree.tree_leaves(original(*facts.fresh()))
        out = pytree.tree_leaves(rewritten(*facts.fresh()))
    if len(ref) != len(out):
        raise RuntimeError(f"rewritten graph returns {len(out)} values, original {len(ref)}")
    names = output_names(original, facts)
    if len(names) != len(ref):
        names = [str(i) for i in range(len(ref))]
    return [compare(name, r, o) for name, r, o in zip(names, ref, out)]


def compare(name: str, ref: Any, out: Any) -> dict[str, Any]:
    """One output's row: floats by error (max_abs, rel_fro, cosine, sqnr_db), integer and
    bool tensors and other values by the fraction of elements that agree exactly."""
    if isinstance(ref, torch.Tensor) and not isinstance(out, torch.Tensor):
        return {"output": name, "agreement": 0.0, "exact": False,
                "note": f"the compiled model returned {type(out).__name__} here"}
    if isinstance(ref, torch.Tensor) and ref.is_floating_point():
        return {"output": name, **error_stats(ref, out)}
    if isinstance(ref, torch.Tensor):
        same = isinstance(out, torch.Tensor) and ref.shape == out.shape
        agree = (ref == out).double().mean().item() if same and ref.numel() else float(same)
        return {"output": name, "agreement": agree, "exact": agree == 1.0}
    equal = bool(ref == out)
    return {"output": name, "agreement": float(equal), "exact": equal}


def named_leaves(value: Any, name: str = "") -> list[tuple[str, Any]]:
    """(path, leaf) for a model's output: `logits`, `hidden_states.2`, and a cache object's
    per-layer tensors (`cache.0.keys`). Walked by hand: not every transformers version
    registers its ModelOutput with torch's pytree, and none its cache classes."""
    def join(key: Any) -> str:
        return f"{name}.{key}" if name else str(key)

    if isinstance(value, torch.Tensor) or value is None:
        return [(name or "output", value)]
    if isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "keys")):
        return [leaf for k, v in value.items() for leaf in named_leaves(v, join(k))]
    if isinstance(value, (tuple, list)):
        return [leaf for i, v in enumerate(value) for leaf in named_leaves(v, join(i))]
    layers = getattr(value, "layers", None)
    if isinstance(layers, (list, tuple)):
        return [(join(f"{i}.{attr}"), getattr(layer, attr)) for i, layer in enumerate(layers)
                for attr in ("keys", "values")
                if isinstance(getattr(layer, attr, None), torch.Tensor)]
    return [(name or "output", value)]


def verify_model(model: torch.nn.Module, *inputs: Any, **options: Any) -> list[dict[str, Any]]:
    """Run `model` eagerly and compiled with effc (`options`) on `inputs`; a row per output.

    A single dict input is passed as keyword arguments (tokenizer output). Runs under
    `torch.no_grad()`, like inference; the compiled model's report is in `effc.report()`.
    """
    args, kwargs = ((), inputs[0]) if len(inputs) == 1 and isinstance(inputs[0], dict) else (
        inputs, {})
    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    with torch.no_grad():
        ref = named_leaves(model(*map(clone, args), **{k: clone(v) for k, v in kwargs.items()}))
        compiled = torch.compile(model, backend="effc", options=options)
        out = dict(named_leaves(compiled(*map(clone, args),
                                         **{k: clone(v) for k, v in kwargs.items()})))
    return [compare(name, r, out.get(name)) for name, r in ref]
