"""Stale-weight guard: notice when a weight a rewrite was derived from has changed since.

Weight-rewriting passes turn parameter values into constants (factors, codes) at compile
time. Dynamo passes the live parameters into the compiled graph on every call, so the guard
compares each source parameter with a stamp taken at compile time: the same tensor object,
storage pointer and version counter (bumped by every in-place update: an optimizer step,
`load_state_dict`, `with torch.no_grad(): w.mul_(2)`). A mismatch means the constants are
stale and the graph must be re-derived before it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from effc.compiler.graph_facts import GraphFacts


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors track no version; identity and pointer still do
        return None


@dataclasses.dataclass(frozen=True)
class WeightStamp:
    """A weight's identity and version when its derived constants were computed."""

    index: int
    name: str
    obj_id: int
    data_ptr: int
    version: int | None

    @classmethod
    def of(cls, index: int, name: str, t: torch.Tensor) -> WeightStamp:
        return cls(index, name, id(t), t.data_ptr(), _version(t))

    def matches(self, t: Any) -> bool:
        return (isinstance(t, torch.Tensor) and id(t) == self.obj_id
                and t.data_ptr() == self.data_ptr and _version(t) == self.version)


def stamp(facts: GraphFacts, names: Iterable[str]) -> list[WeightStamp]:
    """Stamps for the named weights of a graph (the ones constants were derived from)."""
    return [WeightStamp.of(facts.weights[n].index, n, facts.weights[n].value) for n in sorted(names)]


def stale(stamps: Sequence[WeightStamp], args: Sequence[Any]) -> list[str]:
    """Names of the stamped weights that differ in `args` from when they were stamped."""
    return [s.name for s in stamps if not s.matches(args[s.index])]


def restamp(stamps: Sequence[WeightStamp], args: Sequence[Any]) -> list[WeightStamp]:
    """Stamps of the same weights as they are in `args` now."""
    return [WeightStamp.of(s.index, s.name, args[s.index]) for s in stamps]
