"""Helpers for the Triton lowering tests: trace a function, lower it, run it on poisoned outputs."""

from __future__ import annotations

import contextlib
import inspect
import os

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
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
        # meta["val"], with the device, as Dynamo's (constants the function closes over are real)
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
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


# torch's functions for the activations effc's GEMM ops fuse (effc.kernels.low_rank.ACTIVATIONS)
TORCH_ACTIVATIONS = {"none": lambda y: y, "relu": F.relu, "gelu": F.gelu,
                     "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"), "silu": F.silu}


@pytest.fixture
def no_tf32():
    """fp32 comparisons are tight (some exact): keep fp32 dots in IEEE precision on CUDA.
    A test module makes it autouse with `pytestmark = pytest.mark.usefixtures("no_tf32")`."""
    matmul = torch.backends.cuda.matmul  # a property object: monkeypatch cannot restore it
    saved = matmul.allow_tf32
    matmul.allow_tf32 = False
    yield
    matmul.allow_tf32 = saved


@pytest.fixture
def on_device():
    """EFFC_TEST_DEVICE=cuda: modules and inputs are made on the GPU."""
    if DEVICE.type == "cpu":
        yield
        return
    with torch.device(DEVICE):
        yield


def tol(dtype):
    """The tolerance for a graph computed in `dtype` (its outputs may be cast to another)."""
    return 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps


def rand(*shape, dtype=torch.float32, seed=0):
    """Seeded normal values, drawn on the CPU (the same on every device), on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, device="cpu").to(dtype=dtype, device=DEVICE)


def assert_close(out, ref, dtype=None):
    """Same dtype, shape and strides, values within tol(dtype or ref's dtype)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.stride() == ref.stride()
    t = tol(dtype or ref.dtype)
    torch.testing.assert_close(out, ref, rtol=t, atol=t)


def compile_triton(model, options=None, **kwargs):
    """`model` compiled by effc with lowering="triton" (plus `options`)."""
    return torch.compile(model, backend="effc", options={"lowering": "triton", **(options or {})},
                         **kwargs)

