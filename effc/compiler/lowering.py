"""Lowering: turn the rewritten GraphModule into the callable Dynamo runs.

`eager` runs the graph as FX code (effc ops through their torch references); `inductor`
hands it to inductor's compile_fx; `auto` is eager on every device until the Triton
lowering lands (DESIGN.md: Triton on CUDA, eager on CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx


def resolve(lowering: str) -> str:
    """The concrete lowering `auto` stands for on this build."""
    return "eager" if lowering == "auto" else lowering


def lower(gm: fx.GraphModule, example_inputs: Sequence[Any], lowering: str) -> Callable:
    """The callable for `gm` under `lowering` (already validated by Config)."""
    kind = resolve(lowering)
    if kind == "eager":
        return gm.forward
    if kind == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, list(example_inputs))
    raise ValueError(f"effc option 'lowering': {lowering!r} is not implemented")
