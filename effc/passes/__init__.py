"""Rewrite passes, one module each. `PASSES` is the registry and its order is the pass order.

The fixed order (DESIGN.md): kv_proj -> token_skip -> low_rank -> hypercomplex -> shift_add.
A pass is added by writing its module and listing its class here, in its place. A name that
is not registered is rejected by `Config.from_options` like a typo.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from effc.passes.base import Pass, PassResult
from effc.passes.hypercomplex import HypercomplexPass
from effc.passes.kv_proj import KVProjPass
from effc.passes.low_rank import LowRankPass
from effc.passes.shift_add import ShiftAddPass
from effc.passes.token_skip import TokenSkipPass

PASSES: list[type[Pass]] = [
    KVProjPass,
    TokenSkipPass,
    LowRankPass,
    HypercomplexPass,
    ShiftAddPass,
]


def registered() -> dict[str, type[Pass]]:
    """name -> pass class, in pass order."""
    return {p.name: p for p in PASSES}


@contextlib.contextmanager
def extra_passes(*classes: type[Pass]) -> Iterator[None]:
    """Register passes for the duration of a block (tests, experiments), after the built-ins."""
    taken = [c.name for c in classes if c.name in registered()]
    if taken:
        raise ValueError(f"pass name already registered: {', '.join(taken)}")
    PASSES.extend(classes)
    try:
        yield
    finally:
        for c in classes:
            PASSES.remove(c)


__all__ = ["PASSES", "Pass", "PassResult", "extra_passes", "registered"]
