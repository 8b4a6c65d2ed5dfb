"""Launchers: the Python callables that replace a fused group in the FX graph.

A launcher reads sizes from the tensors it is given, allocates the outputs, computes the
grid and launches the kernel. When it cannot (a runtime size the kernel was not generated for,
a row too long for one block, a kernel that fails to compile or launch), it runs the group's
original nodes eagerly instead and says so once through `notify` (the report), or raises
under `strict`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

POISON_OUTPUTS = False  # tests: fill outputs with NaN before launch, so unwritten elements show
# Generated code rounds every op's result to the tensor's dtype, as eager does. Triton on a GPU
# turns those fp32 ops with their round trips into native fp16/bf16 ops and then contracts a
# multiply and an add into one FMA (one rounding instead of two): rope and x * w + b then differ
# from eager by many ulps where they cancel. Every generated kernel is compiled without that.
NO_FMA = {"enable_fp_fusion": False}


def alloc(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
          order: Sequence[int] | None = None) -> torch.Tensor:
    """An output buffer; `order` (outermost to innermost dim) gives eager's memory layout."""
    if order is not None and list(order) != sorted(order):
        permuted = alloc([shape[k] for k in order], dtype, device)
        inverse = sorted(range(len(order)), key=lambda k: order[k])
        return permuted.permute(inverse)
    if POISON_OUTPUTS:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def eager_subgraph(nodes: Sequence[fx.Node], inputs: Sequence[fx.Node],
                   outputs: Sequence[fx.Node]) -> fx.GraphModule:
    """The group's original nodes as a GraphModule taking `inputs` and returning `outputs`."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        env[n] = graph.placeholder(n.name)
    for n in nodes:
        env[n] = graph.node_copy(n, env.__getitem__)
    result = [env[n] for n in outputs]
    graph.output(result[0] if len(result) == 1 else tuple(result))
    return fx.GraphModule(torch.nn.Module(), graph, class_name="EagerGroup")


class Launcher:
    """Base: subclasses implement `launch(*inputs)`; this adds the eager fallback."""

    kind = "?"

    def __init__(self, name: str, kernel: Any, plan: Any, fallback: Callable,
                 notify: Callable[[str], None], strict: bool, n_inputs: int):
        self.__name__ = name  # FX prints the call under this name
        self.__module__ = "effc.generated"
        self.__qualname__ = name
        self.kernel, self.plan, self.fallback = kernel, plan, fallback
        self.notify, self.strict = notify, strict
        self.n_inputs = n_inputs  # the tensors the kernel reads; later args serve the fallback
        self.broken: str | None = None
        self.launches = 0

    def __call__(self, *args: Any) -> Any:
        inputs = args[:self.n_inputs]
        if self.broken is None:
            try:
                out = self.launch(*inputs)
                self.launches += 1
                return out
            except Unfit as exc:  # these inputs only: the next call may fit
                why = str(exc)
            except Exception as exc:
                if self.strict:
                    raise
                self.broken = why = f"kernel failed: {type(exc).__name__}: {exc}"
            if self.strict:
                raise RuntimeError(f"effc triton lowering, kernel {self.__name__}: {why}")
            self.notify(why)
        return self.fallback(*args)

    def launch(self, *inputs: Any) -> Any:
        """Run the kernel on `inputs`; raise Unfit, before any work, for inputs it cannot take
        (shapes checked once, on the way to the launch arguments: this runs every call)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<effc {self.kind} kernel {self.__name__}>"


class Unfit(Exception):
    """Runtime inputs a kernel was not generated for (their call runs the eager subgraph)."""


def check_static(shape: Sequence[int], expected: Sequence[Any]) -> None:
    """Runtime sizes must equal the sizes baked into the kernel (sympy ints; symbols are free)."""
    if len(shape) != len(expected):
        raise Unfit(f"rank {len(shape)} at run time, kernel generated for rank {len(expected)}")
    for k, (got, want) in enumerate(zip(shape, expected)):
        if getattr(want, "is_Integer", False) and int(want) != got:
            raise Unfit(f"dim {k} is {got} at run time, kernel generated for {int(want)}")


def broadcast(*shapes: Sequence[int]) -> tuple[int, ...]:
    """torch.broadcast_shapes for int sizes, without its symbolic-shape machinery (which costs
    more than the rest of a launch)."""
    out = [1] * max(len(s) for s in shapes)
    for s in shapes:
        lead = len(out) - len(s)
        for i, d in enumerate(s):
            if d != 1 and out[lead + i] != d:
                if out[lead + i] != 1:
                    raise Unfit(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[lead + i] = d
    return tuple(out)


def sibling(kernel: Any, name: str) -> Any:
    """Another kernel of the module that defines `kernel` (a jit function, an interpreted one,
    or an autotuner around either): generated modules hold variants side by side."""
    fn = kernel
    while not inspect.isfunction(fn):
        fn = fn.fn
    return fn.__globals__[name]


def cdiv(a: int, b: int) -> int:
    """Ceiling division (triton.cdiv is a jit function: calling it from Python costs ~4 us)."""
    return -(-a // b)


def dense(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`t` broadcast to `shape` and row-major (itself when it already is)."""
    if t.shape == shape and t.is_contiguous():
        return t
    return t.expand(shape).contiguous()


def single_or_tuple(outs: list[torch.Tensor]) -> Any:
    return outs[0] if len(outs) == 1 else tuple(outs)

