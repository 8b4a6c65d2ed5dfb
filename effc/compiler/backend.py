"""`torch.compile(model, backend="effc", options=...)`: the function Dynamo calls per graph.

Flow (DESIGN.md): options -> Config -> PassManager over the enabled passes -> lowering ->
a callable; `verify` measures that callable against the graph as traced. The callable
re-derives the rewrite when a weight it was derived from has changed (stale-weight guard).
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from effc.compiler.config import Config
from effc.compiler.dumper import Dumper, new_graph_name
from effc.compiler.graph_facts import copy_graph_module, graph_device
from effc.compiler.log import configure_from_env, logger
from effc.compiler.lowering import lower, resolve
from effc.compiler.pass_manager import PassContext, PassManager
from effc.compiler.report import GraphReport, Report
from effc.compiler.verify import verify_outputs
from effc.compiler.weight_guard import restamp, stale, stamp
from effc.passes import registered

SESSION = Report()  # every graph compiled in this process since effc.reset()
KEEP_DERIVATIONS = 4  # rewrites kept per graph, keyed by the weights they were derived from


class CompiledGraph:
    """What Dynamo runs for one graph: the lowered, rewritten graph, kept fresh.

    Dynamo hands several instances of one model class (same code, equal options) the same
    compiled graph, with each instance's parameters as inputs. So the last few derivations are
    kept, keyed by the stamps of their source weights: alternating between instances switches
    derivations instead of re-deriving on every call.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], config: Config,
                 grad_enabled: bool, lower_result: bool = True):
        self.original = copy_graph_module(gm)
        self.config = config
        self.lower_result = lower_result
        self.report = GraphReport(graph=new_graph_name(config.debug_dir), grad_enabled=grad_enabled,
                                  config=config.to_dict(), nodes_before=len(gm.graph.nodes),
                                  lowering=resolve(config.lowering, graph_device(example_inputs))
                                  if lower_result else "none")
        self._derivations: OrderedDict[tuple, tuple] = OrderedDict()
        self._logged: set[str] = set()
        self._build(example_inputs)

    def _build(self, example_inputs: Sequence[Any]) -> None:
        start = time.perf_counter()
        config, report = self.config, self.report
        report.passes, report.verify, report.notes = [], [], []
        report.kernels, report.fallbacks = [], []
        gm = copy_graph_module(self.original)
        ctx = PassContext(gm, example_inputs, config, report.grad_enabled)
        report.inputs = ctx.facts.describe()
        instruments = list(config.instruments)
        if config.debug_dir is not None:
            instruments.append(Dumper(Path(config.debug_dir) / report.graph))
        passes = [registered()[name](cfg) for name, cfg in config.passes.items()]
        manager = PassManager(passes, instruments, strict=config.strict, disabled=config.disable)
        gm = manager.run(gm, ctx, report)
        report.warnings = list(ctx.warnings)
        report.notes.extend(ctx.notes)
        for text in report.warnings:  # once per compiled graph, not again on re-derivation
            if text not in self._logged:
                self._logged.add(text)
                logger.warning("%s: %s", report.graph, text)
        report.nodes_after = len(gm.graph.nodes)
        self.gm = gm
        self.fn = gm.forward
        if self.lower_result:
            lowered = lower(gm, example_inputs, config, report, report.grad_enabled)
            self.fn = lowered.fn
            for inst in instruments:
                inst.after_lowering(lowered, ctx, report)
        if config.verify:  # what will run (passes and lowering) against the graph as traced
            report.verify = verify_outputs(self.original, self.fn, ctx.facts)
        self.stamps = stamp(ctx.facts, ctx.ledger.derived_from)
        self._derivations[tuple(self.stamps)] = (self.fn, self.gm)
        while len(self._derivations) > KEEP_DERIVATIONS:
            self._derivations.popitem(last=False)
        report.compile_seconds = time.perf_counter() - start
        for inst in instruments:
            inst.on_graph_end(gm, ctx, report)

    def __call__(self, *args: Any) -> Any:
        if self.stamps:
            changed = stale(self.stamps, args)
            if changed:
                current = tuple(restamp(self.stamps, args))
                if current in self._derivations:  # another instance's weights, seen before
                    self._derivations.move_to_end(current)
                    self.fn, self.gm = self._derivations[current]
                    self.stamps = list(current)
                else:
                    self.report.rederivations += 1
                    self._build(args)
                    self.report.notes.append(f"re-derived after these weights changed: "
                                             f"{', '.join(changed)}")
        return self.fn(*args)


def effc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                 options: Mapping[str, Any] | None = None, mode: str | None = None) -> CompiledGraph:
    """The effc backend (entry point `torch_dynamo_backends: effc`)."""
    if mode is not None:
        raise ValueError(f"effc: torch.compile(mode={mode!r}) has no meaning for effc; "
                         "accepted: mode=None or 'default'. Pass effc's settings in options=")
    configure_from_env()
    config = Config.from_options(options)
    compiled = CompiledGraph(gm, example_inputs, config, torch.is_grad_enabled())
    SESSION.graphs.append(compiled.report)
    return compiled


def session_report() -> Report:
    """Every graph compiled with effc in this process since the last `reset()`."""
    return SESSION


def reset() -> None:
    """Forget the session report, token_skip's routing plans and kv_proj's selection states
    (compiled models keep working)."""
    from effc.passes.token_skip import clear_plans

    SESSION.graphs.clear()
    clear_plans()
    if "effc.token_select" in sys.modules:  # compiled decoding's selection states
        sys.modules["effc.token_select"].forget_selections()
