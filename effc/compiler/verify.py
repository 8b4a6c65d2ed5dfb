"""The `verify` option: run the original and the rewritten graph on the example inputs.

Each graph gets its own clones of the non-weight tensor inputs, so a graph that mutates an
input (a KV-cache update) cannot leak into the other run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from effc.compiler.graph_facts import GraphFacts
from effc.compiler.metrics import error_stats


def _fresh_inputs(facts: GraphFacts) -> list[Any]:
    return [gi.value.clone() if gi.kind == "input" and isinstance(gi.value, torch.Tensor)
            else gi.value for gi in facts.inputs]


def verify_outputs(original: Callable, rewritten: Callable, facts: GraphFacts
                   ) -> list[dict[str, Any]]:
    """Per output: max_abs, rel_fro, cosine, sqnr_db of rewritten vs original."""
    with torch.no_grad():
        ref = pytree.tree_leaves(original(*_fresh_inputs(facts)))
        out = pytree.tree_leaves(rewritten(*_fresh_inputs(facts)))
    if len(ref) != len(out):
        raise RuntimeError(f"rewritten graph returns {len(out)} values, original {len(ref)}")
    rows = []
    for i, (r, o) in enumerate(zip(ref, out)):
        if isinstance(r, torch.Tensor) and r.is_floating_point():
            rows.append({"output": i, **error_stats(r, o)})
        elif isinstance(r, torch.Tensor):
            rows.append({"output": i, "exact": bool(torch.equal(r, o))})
        else:
            rows.append({"output": i, "exact": bool(r == o)})
    return rows
