"""Helpers for the Triton lowering tests: trace a function, lower it, run it on poisoned outputs."""

from __future__ import annotations

import contextlib
import inspect
import os

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

import effc.kernels.low_rank  # noqa: F401  (torch.ops.effc.low_rank_linear)
from effc.compiler.lowering.codegen import launch
from effc.compiler.config import Config
from effc.compiler.report import GraphReport
from effc.compiler.lowering.triton_lowering import lower_triton

LOW_RANK = torch.ops.effc.low_rank_linear
# where test tensors live: "cpu" (kernels under the Triton interpreter), or "cuda" to run the
# same tests on compiled kernels (scripts/gpu_check.sh sets EFFC_TEST_DEVICE=cuda)
DEVICE = torch.device(os.environ.get("EFFC_TEST_DEVICE", "cpu"))


def traced(fn, *inputs) -> fx.GraphModule:
    """`fn` as an FX graph with shape metadata (symbolic_trace spells ops as Dynamo does)."""
    if not inspect.isfunction(fn) or len(inspect.signature(fn).parameters) != len(inputs):
        # builtins, or F.silu with its own `inplace` parameter: trace a call with fixed arity
        f = fn
        fn = [lambda a: f(a), lambda a, b: f(a, b), lambda a, b, c: f(a, b, c)][len(inputs) - 1]
    gm = fx.symbolic_trace(fn)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    return gm


@contextlib.contextmanager
def poisoned_outputs():
    """Kernel outputs start as NaN: an element a kernel fails to write cannot pass."""
    saved = launch.POISON_OUTPUTS
    launch.POISON_OUTPUTS = True
    try:
        yield
    finally:
        launch.POISON_OUTPUTS = saved


def lower(fn, *inputs, **options):
    """(outputs, report, lowered GraphModule, kernel sources) of `fn` lowered with Triton."""
    gm = traced(fn, *inputs)
    config = Config.from_options({"lowering": "triton", **options}, env={})
    report = GraphReport(graph="test")
    lowered, sources = lower_triton(gm, inputs, config, report, grad_enabled=False)
    with poisoned_outputs(), torch.no_grad():
        out = lowered(*inputs)
    return out, report, lowered, sources


def as_tuple(out):
    return out if isinstance(out, (tuple, list)) else (out,)
