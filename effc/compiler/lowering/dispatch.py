"""Lowering: turn the rewritten GraphModule into the callable Dynamo runs.

`eager` runs the graph as FX code (effc ops through their torch references); `inductor`
hands it to inductor's compile_fx; `triton` replaces fusable groups by generated Triton
kernels (effc/compiler/lowering/triton_lowering.py; on CPU under the Triton interpreter); `auto` is
`eager` on every device for now. DESIGN.md's picture is Triton on CUDA; that waits until the
generated kernels have been run on a GPU (so far only the interpreter has run them), and it
must keep "no options = eager's numbers, bit for bit", which fused kernels do not promise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from effc.compiler.graph_facts import graph_device


@dataclasses.dataclass
class Lowered:
    """The callable, the FX graph it runs (None for inductor) and generated kernel sources."""

    fn: Callable
    gm: fx.GraphModule | None = None
    sources: dict[str, str] = dataclasses.field(default_factory=dict)


def resolve(lowering: str, device: torch.device | None = None) -> str:
    """The concrete lowering `lowering` stands for on a graph whose tensors are on `device`."""
    return "eager" if lowering == "auto" else lowering


def lower(gm: fx.GraphModule, example_inputs: Sequence[Any], config: Any, report: Any,
          grad_enabled: bool) -> Lowered:
    """Lower `gm` as `config.lowering` says (already validated by Config)."""
    kind = resolve(config.lowering, graph_device(example_inputs))
    if kind == "eager":
        return Lowered(gm.forward, gm)
    if kind == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return Lowered(compile_fx(gm, list(example_inputs)))
    if kind == "triton":
        from effc.compiler.lowering.triton_lowering import lower_triton

        lowered, sources = lower_triton(gm, example_inputs, config, report, grad_enabled)
        return Lowered(lowered.forward, lowered, sources)
    raise ValueError(f"effc option 'lowering': {config.lowering!r} is not implemented")
