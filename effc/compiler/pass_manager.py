"""The pass manager: runs enabled passes in order, observably, and never leaves a broken graph.

In the spirit of torch.fx's PassManager and TVM's PassContext/PassInstrument: instruments hook
before/after each pass (the dumper is one), every pass is timed, the graph is linted and
recompiled after each pass, and a pass that raises is rolled back to the graph it started
from (or re-raised under `strict`). `PassContext` is what a pass sees of the world.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from effc.compiler.config import Config, PassConfig
from effc.compiler.graph_facts import (GraphFacts, add_constant, copy_graph_module, graph_device,
                                       matches)
from effc.compiler.log import logger
from effc.compiler.report import GraphReport, PassRecord, SiteRow
from effc.passes.base import Pass


class Instrument:
    """Hooks around the passes of one graph. Override what you need; all default to no-ops."""

    def on_graph_start(self, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def before_pass(self, name: str, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def after_pass(self, name: str, gm: fx.GraphModule, ctx: PassContext,
                   record: PassRecord) -> None: ...

    def after_lowering(self, lowered: Any, ctx: PassContext, report: GraphReport) -> None:
        """`lowered` is effc.compiler.lowering.Lowered: the graph that runs and kernel sources."""

    def on_graph_end(self, gm: fx.GraphModule, ctx: PassContext,
                     report: GraphReport) -> None: ...


class PrintGraphs(Instrument):
    """Print the graph's code after every pass (a debugging aid)."""

    def after_pass(self, name, gm, ctx, record):
        print(f"# effc: graph after {name} ({record.status})\n{gm.code}")


@dataclasses.dataclass
class _Ledger:
    """What passes have taken so far; snapshotted and restored around each pass."""

    claims: dict[str, str] = dataclasses.field(default_factory=dict)   # weight -> pass
    derived_from: set[str] = dataclasses.field(default_factory=set)    # weights read for constants
    rewrites: int = 0


class PassContext:
    """What a pass sees: weights and names, example inputs, options, and the claim ledger."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], config: Config,
                 grad_enabled: bool):
        self.facts = GraphFacts(gm, example_inputs)
        self.example_inputs = list(example_inputs)
        self.config = config
        self.calibration = config.calibration  # effc.compiler.calibration.Calibration or None
        self.grad_enabled = grad_enabled
        self.ledger = _Ledger()
        self.current_pass: str = ""
        self.current_config: PassConfig | None = None
        self.warnings: list[str] = []  # what silently does less than asked; logged per graph
        self.notes: list[str] = []     # what a pass wants the report to say about the graph

    def note(self, text: str) -> None:
        """Add a line to this graph's report (a pass's summary: bound met, forwards spent)."""
        if text not in self.notes:
            self.notes.append(text)

    def warn(self, text: str) -> None:
        """Record a warning for this graph (the backend logs it once, on effc's logger)."""
        text = f"{self.current_pass}: {text}" if self.current_pass else text
        if text not in self.warnings:
            self.warnings.append(text)

    # --- where a pass may act -------------------------------------------------------------
    def selected(self, name: str) -> bool:
        """True if the global and the current pass's include/exclude filters admit `name`."""
        cfg = self.current_config
        return (matches(name, self.config.include, self.config.exclude)
                and (cfg is None or matches(name, cfg.include, cfg.exclude)))

    def claim(self, site: str, weights: Sequence[str] = ()) -> str | None:
        """Ask to rewrite `site` (reading `weights`). None if granted, else the reason it is not.

        A weight already claimed by another pass is not rewritten twice; `max_rewrites` caps
        the total number of rewrites (for bisecting which site hurt).
        """
        taken = [(w, self.ledger.claims[w]) for w in weights
                 if self.ledger.claims.get(w, self.current_pass) != self.current_pass]
        if taken:
            return f"weight {taken[0][0]} already rewritten by {taken[0][1]}"
        cap = self.config.max_rewrites
        if cap is not None and self.ledger.rewrites >= cap:
            return f"max_rewrites={cap} reached"
        for w in weights:
            self.ledger.claims[w] = self.current_pass
        self.ledger.rewrites += 1
        return None

    # --- constants derived from weights ----------------------------------------------------
    def add_constant(self, gm: fx.GraphModule, tensor: torch.Tensor, *, derived_from: Sequence[str],
                     name_hint: str) -> fx.Node:
        """Add `tensor` to the graph as a constant; the guard re-derives if a source changes."""
        unknown = [w for w in derived_from if w not in self.facts.weights]
        if unknown:
            raise KeyError(f"derived_from names no weight of this graph: {unknown}")
        self.ledger.derived_from.update(derived_from)
        return add_constant(gm, tensor, name_hint)

    @property
    def device(self) -> torch.device:
        """Device of the first tensor input (CPU for a graph without tensors)."""
        return graph_device(self.example_inputs)


class PassManager:
    """Runs passes in the configured order over one graph, with instruments and rollback."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = (),
                 strict: bool = False, disabled: Sequence[str] = ()):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.strict = strict
        self.disabled = set(disabled)

    def run(self, gm: fx.GraphModule, ctx: PassContext, report: GraphReport) -> fx.GraphModule:
        for inst in self.instruments:
            inst.on_graph_start(gm, ctx)
        _check_filters(ctx, "", ctx.config.include, ctx.config.exclude)
        for p in self.passes:
            gm, record = self._run_one(p, gm, ctx)
            report.passes.append(record)
            _account(p, record, ctx, report.graph)
            for inst in self.instruments:
                inst.after_pass(p.name, gm, ctx, record)
        return gm

    def _run_one(self, p: Pass, gm: fx.GraphModule, ctx: PassContext
                 ) -> tuple[fx.GraphModule, PassRecord]:
        ctx.current_pass, ctx.current_config = p.name, p.config
        for inst in self.instruments:
            inst.before_pass(p.name, gm, ctx)
        if p.name in self.disabled:
            return gm, PassRecord(p.name, status="skipped",
                                  reason="disabled (option 'disable' or EFFC_DISABLE)")
        if p.rewrites_weights and ctx.grad_enabled:
            reason = ("grad mode is on: weight-rewriting passes apply to inference only "
                      "(call the compiled model under torch.no_grad() or torch.inference_mode())")
            if self.strict:
                raise RuntimeError(f"effc pass {p.name}: {reason}")
            return gm, PassRecord(p.name, status="skipped", reason=reason)
        snapshot = copy_graph_module(gm)
        ledger = dataclasses.replace(ctx.ledger, claims=dict(ctx.ledger.claims),
                                     derived_from=set(ctx.ledger.derived_from))
        start = time.perf_counter()
        try:
            with torch.no_grad():
                result = p.run(gm, ctx)
            bad = [type(s).__name__ for s in result.sites if not isinstance(s, SiteRow)]
            if bad:
                raise TypeError(f"pass returned site rows of type {bad[0]}, expected SiteRow")
            gm.graph.lint()
            gm.recompile()
        except Exception as exc:
            if self.strict:
                raise
            ctx.ledger = ledger
            return snapshot, PassRecord(p.name, status="rolled back",
                                        reason=f"{type(exc).__name__}: {exc}",
                                        seconds=time.perf_counter() - start)
        finally:
            ctx.current_pass, ctx.current_config = "", None
        return gm, PassRecord(p.name, seconds=time.perf_counter() - start, sites=list(result.sites))


def _check_filters(ctx: PassContext, owner: str, include: Sequence[str],
                   exclude: Sequence[str]) -> None:
    """Warn about include/exclude patterns that match no weight of the graph."""
    names = list(ctx.facts.weights)
    if not names:
        return
    key = f"{owner}." if owner else ""
    for option, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(matches(n, [pattern]) for n in names):
                ctx.warnings.append(
                    f"option '{key}{option}': pattern {pattern!r} matches no weight of this "
                    f"graph (names look like {names[0]!r}; see model.named_parameters())")


def _account(p: Pass, record: PassRecord, ctx: PassContext, graph: str) -> None:
    """Warnings for a pass that did less than asked, and an info line of what it did."""
    if record.status == "skipped" and not record.reason.startswith("disabled"):
        ctx.warnings.append(f"{p.name} did not run: {record.reason}")
        return
    if record.status == "rolled back":
        ctx.warnings.append(f"{p.name} raised and was rolled back: {record.reason}")
        return
    if record.status != "ran":
        return
    _check_filters(ctx, p.name, p.config.include, p.config.exclude)
    counts = record.counters
    if p.rewrites_weights and counts["seen"] and not counts["rewritten"]:
        reasons = collections.Counter(s.reason for s in record.sites)
        top = "; ".join(f"{n}x {why}" for why, n in reasons.most_common(3))
        ctx.warnings.append(f"{p.name} rewrote none of the {counts['seen']} sites it found "
                            f"({top})")
    elif p.rewrites_weights and not counts["seen"]:
        ctx.warnings.append(f"{p.name} found no site in this graph")
    before = sum(s.params_before for s in record.sites if s.decision == "rewritten")
    after = sum(s.params_after for s in record.sites if s.decision == "rewritten")
    logger.info("%s: %s rewrote %d of %d sites (parameters of those %d -> %d) in %.2fs", graph,
                p.name, counts["rewritten"], counts["seen"], before, after, record.seconds)
