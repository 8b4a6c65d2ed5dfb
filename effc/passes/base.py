"""The contract of a pass: a name, a typed config, and run(gm, ctx) -> PassResult."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch.fx as fx

from effc.compiler.config import PassConfig
from effc.compiler.report import SiteRow

if TYPE_CHECKING:
    from effc.compiler.pass_manager import PassContext


@dataclasses.dataclass
class PassResult:
    """The sites a pass looked at (rewritten or skipped, each with a reason)."""

    sites: list[SiteRow] = dataclasses.field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(s.decision == "rewritten" for s in self.sites)


class Pass:
    """A rewrite pass. Subclasses set `name` and `config_cls` and implement `run`.

    `run` finds sites, decides per site, rewrites the chosen ones in place in `gm.graph`
    (through effc custom ops), and returns a row for every site it saw. Before rewriting a
    site it asks `ctx.claim(...)`; constants derived from weights go through
    `ctx.add_constant(...)` so the stale-weight guard can watch their sources.
    `rewrites_weights` passes run on inference graphs only (grad mode off).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[PassConfig]] = PassConfig
    rewrites_weights: ClassVar[bool] = False

    def __init__(self, config: PassConfig):
        self.config = config

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError
