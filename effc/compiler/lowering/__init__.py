"""The lowering: the rewritten graph becomes the callable Dynamo runs.

`dispatch` picks eager, inductor or Triton; for Triton, `graph_rewrites` prepares a copy of
the graph, `ops` classifies every call, `partition` groups fusable nodes, and `codegen`
writes, caches and launches one kernel per group (`triton_lowering` ties them together).
"""

from effc.compiler.lowering.dispatch import Lowered, lower, resolve

__all__ = ["Lowered", "lower", "resolve"]
