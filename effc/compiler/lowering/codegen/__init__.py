"""Triton code generation for partitioned groups: source text, loading, launchers.

`generate(group)` returns the kernel's source (one module per group, readable, named after
what it computes); `build(group, ...)` also loads it through the source-hash cache and wraps it
in the launcher that replaces the group in the FX graph. Generators: pointwise.py (elementwise
chains), reduction.py (row reductions), templates.py (GEMM-like ops with an epilogue slot;
the phm and shift ops' launch rules and tiling are in phm_template.py and shift_template.py).
"""

from __future__ import annotations

from collections.abc import Callable

from effc.compiler.lowering.codegen import pointwise, reduction, templates
from effc.compiler.lowering.codegen.cache import load
from effc.compiler.lowering.codegen.common import CodegenError, Source
from effc.compiler.lowering.codegen.launch import Launcher, eager_subgraph
from effc.compiler.lowering.partition import Group

_GENERATORS = {"pointwise": (pointwise.generate, pointwise.PointwiseLauncher),
               "row": (reduction.generate, reduction.RowLauncher),
               "gemm": (templates.generate, templates.GemmLauncher)}


def generate(group: Group, target: str = "interpreter") -> Source:
    """The Triton module for `group` (raises CodegenError for what it cannot express).

    `target`: "cuda" (GEMM templates are autotuned) or "interpreter" (one fixed config).
    """
    if group.kind == "gemm":
        return templates.generate(group, target)
    return _GENERATORS[group.kind][0](group)


def build(group: Group, source: Source, *, cache_dir: str | None, notify: Callable[[str], None],
          strict: bool) -> Launcher:
    """Load `source` (cached by hash) and wrap it in the launcher for `group`."""
    kernel = load(source.text, source.name, cache_dir)
    fallback = eager_subgraph(group.nodes, group.inputs + group.extra_deps, group.outputs)
    return _GENERATORS[group.kind][1](source.name, kernel, source.plan, fallback, notify, strict,
                                      len(group.inputs))


__all__ = ["CodegenError", "Launcher", "Source", "build", "generate"]
