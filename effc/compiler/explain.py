"""`effc.explain(model, *inputs, **options)`: the report of what effc would do, as an object.

Dynamo needs one real call to capture the graphs (as `torch._dynamo.explain` does). The
backend used here runs every pass and records the report, but hands Dynamo the graph as it
was traced, so the call computes eager's numbers and the rewritten graph never runs (unless
`verify=True` asks for exactly that). Runs under `torch.no_grad()`, like inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from effc.compiler.backend import CompiledGraph
from effc.compiler.config import Config
from effc.compiler.report import Report


def explain(model: torch.nn.Module, *inputs: Any, **options: Any) -> Report:
    """Compile `model` with effc's passes for `inputs` and return the report without lowering.

    A single dict input is passed as keyword arguments (tokenizer output), like `model(**batch)`.
    """
    config = Config.from_options(options)
    report = Report()

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        compiled = CompiledGraph(gm, example_inputs, config, torch.is_grad_enabled(),
                                 lower_result=False)
        report.graphs.append(compiled.report)
        return compiled.original.forward

    compiled_model = torch.compile(model, backend=backend)
    with torch.no_grad():
        if len(inputs) == 1 and isinstance(inputs[0], dict):
            compiled_model(**inputs[0])
        else:
            compiled_model(*inputs)
    return report
