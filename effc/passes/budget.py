"""Candidates, end-to-end sensitivity and one allocator, shared by the weight passes.

Per site a pass offers candidates (a rank, later n and terms, bits and terms), each with its
cost (parameters, bytes, FLOPs) and its own error e (the layer's relative output error when
calibrated, else the weight's). What matters is the error at the graph's outputs, and a layer's
own error is a poor proxy for it: a classifier's 5 % error moves the logits far more than a
5 % error in an early 1x1 conv. So each site gets a sensitivity s, measured end to end: the
graph runs on the calibration's sample inputs with that site's weight replaced by one probe
candidate, and s = E_out^2 / e^2 (E_out: the outputs' relative error). Errors of a few sites
are then predicted as sum_i s_i e_i^2, which is what the allocator minimizes per parameter.
Cost: one forward per site and sample call, plus one to check the final choice.

Without samples (no calibration, or one without sample inputs) s = 1 for every site: the
data-free proxy is the sum of the sites' own squared errors, and the report says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from effc.compiler.calibration.observer import graph_key
from effc.compiler.graph_facts import GraphFacts, copy_graph_module, hinted, node_value
from effc.compiler.log import logger
from effc.compiler.metrics import sqnr_db

PROBE_ERROR = 0.1  # the own error of the candidate a site's sensitivity is measured with
DEFAULT_MIN_SQNR_DB = 25.0   # the quality-bounded default with calibration samples (~5.6 %)
MAX_CHECKS = 3               # re-allocations when the measured output error misses the bound
REFINE_ROUNDS = 3            # budget rule: re-measure at the chosen candidates, re-allocate


@dataclasses.dataclass
class Candidate:
    """One way to rewrite a site: its cost and its own error (`choice` is the pass's own)."""

    choice: Any          # e.g. a rank; None for "keep dense"
    params: int
    error: float         # relative error of the site itself (0 for dense)
    bytes: int = 0
    flops: int = 0


@dataclasses.dataclass
class SiteOptions:
    """A site's candidates (the dense one included) and its end-to-end sensitivity."""

    key: str
    candidates: list[Candidate]
    sensitivity: float = 1.0
    measured: bool = False   # sensitivity measured end to end (else the data-free 1.0)

    def hull(self, cost: str = "params") -> list[Candidate]:
        """The candidates on the lower convex hull of (cost, s e^2): the only ones a greedy
        walk by marginal gain can stop at, in increasing cost ("params" or "bytes")."""
        pts = sorted(self.candidates, key=lambda c: (getattr(c, cost), c.error))
        out: list[Candidate] = []
        for c in pts:
            if out and c.error >= out[-1].error:
                continue  # more cost for no less error
            while len(out) >= 2 and _cross(out[-2], out[-1], c, cost) <= 0:
                out.pop()
            out.append(c)
        return out


def _cross(a: Candidate, b: Candidate, c: Candidate, cost: str = "params") -> float:
    """> 0 if b lies below the segment a-c in (cost, error^2): b stays on the hull."""
    ax, bx, cx = getattr(a, cost), getattr(b, cost), getattr(c, cost)
    ay, by, cy = a.error ** 2, b.error ** 2, c.error ** 2
    return (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)


def predicted(sites: Sequence[SiteOptions], choice: dict[str, Candidate]) -> float:
    """Predicted squared relative output error: sum_i s_i e_i^2."""
    return sum(s.sensitivity * choice[s.key].error ** 2 for s in sites)


def allocate(sites: Sequence[SiteOptions], *, max_params: float | None = None,
             max_error2: float | None = None, cost: str = "params") -> dict[str, Candidate]:
    """One candidate per site, walking every site up its hull from the cheapest candidate.

    Each step buys the move with the largest drop of predicted squared output error per unit
    of `cost` ("params", or "bytes" for a bytes budget). With `max_params` (a budget in that
    unit) it stops when no move fits the budget; with `max_error2` as soon as the predicted
    squared error is at most that bound (the least cost for it).
    """
    hulls = {s.key: s.hull(cost) for s in sites}
    pos = {s.key: 0 for s in sites}
    size = lambda c: getattr(c, cost)  # noqa: E731
    spent = sum(size(hulls[s.key][0]) for s in sites)
    if max_params is not None and spent > max_params:
        budget = "param_budget" if cost == "params" else f"{cost}_budget"
        raise ValueError(f"{budget} too small: it allows {int(max_params)} {cost}, but "
                         f"the cheapest candidate of every site needs {spent}")
    error2 = sum(s.sensitivity * hulls[s.key][0].error ** 2 for s in sites)
    while max_error2 is None or error2 > max_error2:
        best, best_gain = None, 0.0
        for s in sites:
            h, i = hulls[s.key], pos[s.key]
            if i + 1 >= len(h):
                continue
            step = size(h[i + 1]) - size(h[i])
            if max_params is not None and spent + step > max_params:
                continue
            gain = s.sensitivity * (h[i].error ** 2 - h[i + 1].error ** 2) / max(step, 1)
            if gain > best_gain:
                best, best_gain = s, gain
        if best is None:
            break
        h, i = hulls[best.key], pos[best.key]
        spent += size(h[i + 1]) - size(h[i])
        error2 -= best.sensitivity * (h[i].error ** 2 - h[i + 1].error ** 2)
        pos[best.key] = i + 1
    return {k: hulls[k][i] for k, i in pos.items()}


MAX_SPLIT = 8  # calls one sample is split into at most (each is run for a reference)


def _batch_split(sample: Sequence[Any], facts: GraphFacts) -> list[tuple]:
    """`sample` cut along its batch into calls of the graph's batch size, where every tensor
    of both has one size on dim 0 and the graph's divides the sample's (a model calibrated
    on batches of 8 and compiled for one sequence), at most MAX_SPLIT of them; else []."""
    mine = {v.shape[0] for v in sample if isinstance(v, torch.Tensor) and v.dim()}
    graph = {gi.value.shape[0] for gi in facts.inputs if gi.kind == "input"
             and isinstance(gi.value, torch.Tensor) and gi.value.dim()}
    if len(mine) != 1 or len(graph) != 1 or any(
            isinstance(v, torch.Tensor) and not v.dim() for v in sample):
        return []
    (b,), (g,) = mine, graph
    if not isinstance(g, int) or g >= b or b % g or any(
            isinstance(v, int) and not isinstance(v, bool) and v == b for v in sample):
        return []
    return [tuple(v[i:i + g] if isinstance(v, torch.Tensor) else v for v in sample)
            for i in range(0, min(b, g * MAX_SPLIT), g)]


class EndToEnd:
    """Runs a graph on sample inputs with some weights replaced; measures its outputs' error.

    The error of a run is ||ref - out||^2 / ||ref||^2 of the graph's main output, its largest
    float output (the logits, a last hidden state, an intermediate graph's hidden state),
    summed over the sample calls. Other outputs, such as the keys and values a decoder
    returns for its cache, are not what users judge a model by, and, several per layer, they
    would outweigh the logits: measured on a small Llama, allocating by their mean made
    perplexity worse than uniform ranks. The output SQNR in dB is -10 log10 of this ratio.
    """

    def __init__(self, gm: fx.GraphModule, facts: GraphFacts, samples: Sequence[Sequence[Any]]):
        self.gm, self.facts = gm, facts
        self.source = "samples"  # what the inputs are, for the report ("samples", "example")
        self.index = {gi.name: gi.index for gi in facts.inputs if gi.kind in ("parameter", "buffer")}
        self.forwards = 0
        self.calls, self.reference = [], []
        fakes = {n.name: node_value(n) for n in gm.graph.nodes if n.op == "placeholder"}
        self.skipped = 0
        for sample in samples:
            if not self._add(sample, fakes):  # as it is, or split into the graph's batches
                parts = _batch_split(sample, facts)
                added = sum(self._add(p, fakes) for p in parts)
                self.skipped += added == 0

    def _add(self, sample: Sequence[Any], fakes: dict[str, Any]) -> bool:
        args = self._fit(self.facts, sample, fakes)
        if args is None:
            return False
        try:  # a graph traced for other sizes may not run on this sample
            ref = self._outputs(args, {})
        except Exception:  # noqa: BLE001 - any failure means: this sample does not fit
            return False
        self.calls.append(args)
        self.reference.append(ref)
        return True

    @staticmethod
    def _fit(facts: GraphFacts, sample: Sequence[Any], fakes: dict[str, Any]
             ) -> list[Any] | None:
        """The graph's full argument list with `sample`'s inputs, or None if they do not fit.

        A sample recorded on a graph with other size arguments (Dynamo makes a recompiled
        graph dynamic) is matched by its tensors; this graph's size arguments are then read
        off those tensors' shapes. A sample whose shapes a static graph was not traced for is
        tried anyway (a graph that bakes those sizes fails on it, and the caller drops it).
        """
        free = [gi for gi in facts.inputs if gi.kind not in ("parameter", "buffer")]
        tensors_in = [gi for gi in free if gi.kind == "input"]
        args = [gi.value for gi in facts.inputs]
        if len(sample) == len(free):
            pairs = list(zip(free, sample))
        else:
            tensors = [v for v in sample if isinstance(v, torch.Tensor)]
            if len(tensors) != len(tensors_in):
                return None
            pairs = list(zip(tensors_in, tensors))
            for gi in free:
                if gi.kind == "symint":
                    size = _size_of(fakes.get(gi.node_name),
                                    [fakes.get(t.node_name) for t in tensors_in], tensors)
                    if size is None:
                        return None
                    args[gi.index] = size
        for gi, v in pairs:
            ex = gi.value
            if isinstance(ex, torch.Tensor) != isinstance(v, torch.Tensor) or (
                    isinstance(v, torch.Tensor) and (v.dtype != ex.dtype or v.dim() != ex.dim())):
                return None
            args[gi.index] = v.to(ex.device) if isinstance(v, torch.Tensor) else v
        return args

    @staticmethod
    def example_call(facts: GraphFacts) -> tuple:
        """The call being compiled: the graph's inputs that are not weights (tensors and
        size arguments), as a sample for `_fit` / the constructor."""
        return tuple(gi.value for gi in facts.inputs if gi.kind not in ("parameter", "buffer"))

    @staticmethod
    def example_args(gm: fx.GraphModule, facts: GraphFacts) -> list[Any] | None:
        """The graph's full argument list for the call being compiled (sizes concrete)."""
        fakes = {n.name: node_value(n) for n in gm.graph.nodes if n.op == "placeholder"}
        return EndToEnd._fit(facts, EndToEnd.example_call(facts), fakes)

    def __bool__(self) -> bool:
        return bool(self.calls)

    def _outputs(self, args: list[Any], replace: dict[str, torch.Tensor],
                 graph: fx.GraphModule | None = None) -> list[torch.Tensor]:
        run = self.facts.fresh(args)
        for name, value in replace.items():
            run[self.index[name]] = value
        self.forwards += 1
        with torch.no_grad():
            out = pytree.tree_leaves((graph or self.gm)(*run))
        return [o.detach().double() for o in out
                if isinstance(o, torch.Tensor) and o.is_floating_point()]

    @property
    def main(self) -> int:
        """Index (among the float outputs) of the main output: the one computed from the most
        of the graph (the logits, not a layer's keys returned for a cache, even when
        generate() keeps the logits of one position only), the largest among equals."""
        first = self.reference[0]
        if not first:
            return 0
        depth = _output_depths(self.gm)
        if len(depth) != len(first):
            depth = [0] * len(first)
        return max(range(len(first)), key=lambda i: (depth[i], first[i].numel()))

    def error2(self, replace: dict[str, torch.Tensor], calls: int | None = None,
               graph: fx.GraphModule | None = None) -> float:
        """Squared relative error of the main output with `replace`d weights (over the first
        `calls` sample calls, or all), or of `graph`, a rewritten copy of the graph."""
        num = den = 0.0
        i = self.main
        for args, ref in zip(self.calls[:calls], self.reference[:calls]):
            out = self._outputs(args, replace, graph)
            if not ref:
                continue
            num += (ref[i] - out[i]).pow(2).sum().item()
            den += ref[i].pow(2).sum().item()
        return num / den if den > 0 else 0.0


def _output_depths(gm: fx.GraphModule) -> list[int]:
    """For each float tensor output of `gm` (in the order `_outputs` lists them), the number
    of graph nodes it is computed from."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    depths = []
    for leaf in pytree.tree_leaves(out.args[0]):
        val = node_value(leaf) if isinstance(leaf, fx.Node) else leaf
        if not (isinstance(val, torch.Tensor) and val.is_floating_point()):
            continue
        depths.append(_depth(leaf) if isinstance(leaf, fx.Node) else 0)
    return depths


def _depth(node: fx.Node) -> int:
    """The number of graph nodes `node` is computed from."""
    seen, stack = set(), [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return len(seen)


def _size_of(symbol: Any, fakes: Sequence[Any], tensors: Sequence[torch.Tensor]) -> int | None:
    """The value a size argument (its traced SymInt `symbol`) takes for `tensors`: the size
    (or stride) of the first tensor dimension traced as that same symbol (fakes: the tensors'
    traced values)."""
    if not isinstance(symbol, torch.SymInt):
        return None
    for fake, t in zip(fakes, tensors):
        if not isinstance(fake, torch.Tensor) or fake.dim() != t.dim():
            continue
        for traced, real in ((fake.shape, t.shape), (fake.stride(), t.stride())):
            for dim, size in enumerate(traced):
                if isinstance(size, torch.SymInt) and size.node.expr == symbol.node.expr:
                    return int(real[dim])
    return None


def measure_sensitivities(sites: Sequence[SiteOptions], e2e: EndToEnd,
                          probe: Callable[[SiteOptions, Candidate], dict[str, torch.Tensor]],
                          calls: int | None = None) -> None:
    """Set each site's sensitivity from one end-to-end run (over the first `calls` sample
    calls) with a probe candidate.

    `probe(site, candidate)` returns the weight replacements that realize the candidate.
    The probe is the cheapest candidate whose own error is at most PROBE_ERROR (errors that
    small propagate nearly linearly), else the one with the smallest error.
    """
    for s in sites:
        lossy = [c for c in s.candidates if c.error > 0]
        if not lossy:
            continue
        near = [c for c in lossy if c.error <= PROBE_ERROR]
        cand = min(near, key=lambda c: c.params) if near else min(lossy, key=lambda c: c.error)
        s.sensitivity = e2e.error2(probe(s, cand), calls) / cand.error ** 2
        s.measured = True


def db(error2: float) -> float:
    """A squared relative error as SQNR in dB."""
    return sqnr_db(1.0, error2 ** 0.5)


def end_to_end(gm: fx.GraphModule, ctx, *, allocated: bool, compensate: bool
               ) -> EndToEnd | None:
    """The graph and inputs a weight pass measures on: the calibration's samples of this
    graph, or, when none runs on it (traced for other shapes) and the pass allocates, the
    inputs of the call being compiled (independent of the calibration the fits use). None
    without calibration, or when the pass neither allocates nor compensates."""
    calib = ctx.calibration
    if calib is None or not (compensate or allocated):
        return None
    names = [gi.name for gi in ctx.facts.inputs if gi.kind in ("parameter", "buffer")]
    samples = calib.sample_inputs(graph_key(names))
    moved = [tuple(t.to(ctx.device) if isinstance(t, torch.Tensor) else t for t in call)
             for call in samples]
    graph = copy_graph_module(gm)
    e2e = EndToEnd(graph, ctx.facts, moved) if moved else None
    if e2e:
        e2e.source = "samples"
        return e2e
    if not allocated:
        return None
    e2e = EndToEnd(graph, ctx.facts, [EndToEnd.example_call(ctx.facts)])
    if not e2e:
        return None
    e2e.source = "example"
    if samples:
        ctx.warn(f"none of the calibration's {len(samples)} sample inputs of this graph "
                 f"runs on it (the graph was traced for other shapes), so the end-to-end "
                 f"effect is measured on the inputs of the call being compiled; calibrate "
                 f"with batches of the shapes you run to measure on calibration data")
    return e2e


@dataclasses.dataclass
class Allocation:
    """What `choose` picked, and what it measured (for the pass's summary)."""

    choice: dict[str, Candidate]
    measured: float | None     # squared relative output error of the choice (None: no e2e)
    total: int                 # cost of the sites, dense
    kept: int                  # cost of the choice
    cost: str = "params"       # what total and kept count: "params" or "bytes"


def choose(options: Sequence[SiteOptions], e2e: EndToEnd | None, ctx, *, pass_name: str,
           realize: Callable[[dict[str, Candidate]], dict[str, torch.Tensor]],
           max_params: float | None = None, min_sqnr_db: float | None = None,
           end_to_end_sensitivity: bool = True, max_forwards: int = 512,
           cost: str = "params") -> Allocation:
    """Measure sensitivities (end to end when `e2e`), then allocate under `max_params`, or
    to the fewest parameters whose measured output SQNR is at least `min_sqnr_db` (re-
    allocating up to MAX_CHECKS times when the measurement misses what the sum predicted).

    `realize(choice)` returns the weight replacements that realize a choice of candidates.
    """
    if e2e is not None and end_to_end_sensitivity:
        calls = max(1, max_forwards // max(len(options), 1))
        if calls < len(e2e.calls):
            ctx.note(f"{pass_name}: sensitivities measured on {calls} of the {len(e2e.calls)} "
                     f"sample calls ({len(options)} sites, max_forwards={max_forwards})")
        measure_sensitivities(options, e2e, lambda s, c: realize({s.key: c}), calls)
    measured = None
    if max_params is not None:
        choice = allocate(options, max_params=max_params, cost=cost)
        if e2e is not None:
            measured = e2e.error2(realize(choice))
            if end_to_end_sensitivity:
                spare = max_forwards - len(options) * calls  # what the probes left
                choice, measured = _refine(options, e2e, realize, choice, measured,
                                           max_params, cost, calls, spare)
    else:
        target = 10 ** (-(min_sqnr_db if min_sqnr_db is not None else DEFAULT_MIN_SQNR_DB) / 10)
        scale = 1.0
        for _ in range(MAX_CHECKS):
            choice = allocate(options, max_error2=target * scale, cost=cost)
            if e2e is None:
                break
            measured = e2e.error2(realize(choice))
            guess = predicted(options, choice)
            if measured <= target or guess <= 0:
                break
            scale *= min(0.5, 0.9 * guess / measured)  # the sum under-predicted: tighten
    return Allocation(choice, measured, sum(getattr(s.candidates[-1], cost) for s in options),
                      sum(getattr(c, cost) for c in choice.values()), cost)


def _refine(options: Sequence[SiteOptions], e2e: EndToEnd,
            realize: Callable[[dict[str, Candidate]], dict[str, torch.Tensor]],
            choice: dict[str, Candidate], measured: float, max_params: float, cost: str,
            calls: int, max_forwards: int) -> tuple[dict[str, Candidate], float]:
    """A budget's allocation, improved where one probe per site misjudged it.

    A site's sensitivity is measured with a small probe error; a site cut far harder than
    that may hurt the outputs more (or less) than the linear sum predicts. Each round
    re-measures every lossy site at its chosen candidate, re-allocates, and keeps the new
    choice only if its measured output error is lower. Cost per round: one forward per
    lossy site and sample call (within `calls`), plus one check over all calls; a round is
    run only if its re-measurements fit in `max_forwards`.
    """
    for _ in range(REFINE_ROUNDS):
        lossy = sum(1 for c in choice.values() if c.error > 0)
        if lossy * calls > max_forwards:
            break
        max_forwards -= lossy * calls
        for s in options:
            c = choice[s.key]
            if c.error > 0:
                s.sensitivity = e2e.error2(realize({s.key: c}), calls) / c.error ** 2
        new = allocate(options, max_params=max_params, cost=cost)
        if all(new[k] is choice[k] for k in choice):
            break
        error2 = e2e.error2(realize(new))
        if error2 >= measured:
            break
        choice, measured = new, error2
    return choice, measured


def allocation_summary(pass_name: str, rule: str, e2e: EndToEnd | None, sites: int,
                       alloc: Allocation, *, end_to_end_sensitivity: bool,
                       held_out: bool | None, bound: float | None, default: bool,
                       budget: str = "param_budget") -> str:
    """One line for the report and the log: what the allocator kept and how it measured
    (`budget`: the pass's size knob, named where the default asks for more)."""
    unit = "parameters" if alloc.cost == "params" else alloc.cost
    head = (f"{pass_name} {rule}: kept {alloc.kept} of {alloc.total} {unit} over "
            f"{sites} sites")
    if e2e is None:
        return (f"{head}; sensitivity: data-free proxy (each site's own squared relative "
                f"error, summed), as the calibration holds no sample inputs of this graph")
    where = (f"{len(e2e.calls)} calibration sample calls" if e2e.source == "samples" else
             "the inputs of the call being compiled (no calibration sample fits its shapes)")
    how = ("end-to-end sensitivity measured" if end_to_end_sensitivity else
           "sensitivity: each site's own error (sensitivity='layer'); output measured")
    text = (f"{head}; {how} on {where} ({e2e.forwards} forward passes); output SQNR "
            f"{db(alloc.measured):.1f} dB")
    if e2e.source == "samples" and held_out:
        text += (" (fits from the other calibration calls, so this is measured on data they "
                 "were not fitted to; the final fits use every call)")
    elif e2e.source == "samples" and held_out is False:
        text += (" (measured on the data the calibration-aware fits used, which is "
                 "optimistic: calibrate with more batches than samples)")
    if bound is not None:
        text += f" (bound {bound:g} dB)"
        if default:
            text += (f"; this is the quality-bounded default: min_sqnr_db lower, or "
                     f"{budget}, asks for more compression")
    logger.info("%s", text)
    return text


def candidate_details(options: SiteOptions) -> dict[str, Any]:
    """The candidates the allocator chose among, for the report: choice -> [params, bytes,
    FLOPs, own error] (the FLOPs of the example call)."""
    return {"sensitivity": round(options.sensitivity, 6),
            "sensitivity_measured": options.measured,
            "candidates_columns": ["params", "bytes", "flops", "error"],
            "candidates": {("dense" if c.choice is None else str(c.choice)):
                           [c.params, c.bytes, c.flops, round(c.error, 6)]
                           for c in options.candidates}}


def output_sites(gm: fx.GraphModule, sites: set[fx.Node]) -> set[fx.Node]:
    """The `sites` that reach the main output through no other site: a classifier, an LM
    head. The main output is EndToEnd.main's: the float output computed from the most of the
    graph, the largest among equals (sizes of a graph traced dynamic by their hints)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves = [n for n in out.all_input_nodes
              if isinstance(node_value(n), torch.Tensor) and node_value(n).is_floating_point()]
    if not leaves:
        return set()
    main = max(leaves, key=lambda n: (_depth(n), math.prod(
        hinted(d) for d in node_value(n).shape)))
    found, seen, stack = set(), {main}, [main]
    while stack:
        n = stack.pop()
        if n in sites:
            found.add(n)
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return found
