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
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from effc.compiler.graph_facts import GraphFacts

PROBE_ERROR = 0.1  # the own error of the candidate a site's sensitivity is measured with


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

    def hull(self) -> list[Candidate]:
        """The candidates on the lower convex hull of (params, s e^2): the only ones a
        greedy walk by marginal gain can stop at, in increasing parameters."""
        pts = sorted(self.candidates, key=lambda c: (c.params, c.error))
        out: list[Candidate] = []
        for c in pts:
            if out and c.error >= out[-1].error:
                continue  # more parameters for no less error
            while len(out) >= 2 and _cross(out[-2], out[-1], c) <= 0:
                out.pop()
            out.append(c)
        return out


def _cross(a: Candidate, b: Candidate, c: Candidate) -> float:
    """> 0 if b lies below the segment a-c in (params, error^2): b stays on the hull."""
    ax, ay, bx, by, cx, cy = a.params, a.error ** 2, b.params, b.error ** 2, c.params, c.error ** 2
    return (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)


def predicted(sites: Sequence[SiteOptions], choice: dict[str, Candidate]) -> float:
    """Predicted squared relative output error: sum_i s_i e_i^2."""
    return sum(s.sensitivity * choice[s.key].error ** 2 for s in sites)


def allocate(sites: Sequence[SiteOptions], *, max_params: float | None = None,
             max_error2: float | None = None) -> dict[str, Candidate]:
    """One candidate per site, walking every site up its hull from the cheapest candidate.

    Each step buys the move with the largest drop of predicted squared output error per
    parameter. With `max_params` it stops when no move fits the budget; with `max_error2`
    as soon as the predicted squared error is at most that bound (fewest parameters for it).
    """
    hulls = {s.key: s.hull() for s in sites}
    pos = {s.key: 0 for s in sites}
    spent = sum(hulls[s.key][0].params for s in sites)
    if max_params is not None and spent > max_params:
        raise ValueError(f"param_budget too small: it allows {int(max_params)} parameters, but "
                         f"the cheapest candidate of every site needs {spent}")
    error2 = sum(s.sensitivity * hulls[s.key][0].error ** 2 for s in sites)
    while max_error2 is None or error2 > max_error2:
        best, best_gain = None, 0.0
        for s in sites:
            h, i = hulls[s.key], pos[s.key]
            if i + 1 >= len(h):
                continue
            cost = h[i + 1].params - h[i].params
            if max_params is not None and spent + cost > max_params:
                continue
            gain = s.sensitivity * (h[i].error ** 2 - h[i + 1].error ** 2) / max(cost, 1)
            if gain > best_gain:
                best, best_gain = s, gain
        if best is None:
            break
        h, i = hulls[best.key], pos[best.key]
        spent += h[i + 1].params - h[i].params
        error2 -= best.sensitivity * (h[i].error ** 2 - h[i + 1].error ** 2)
        pos[best.key] = i + 1
    return {k: hulls[k][i] for k, i in pos.items()}


class EndToEnd:
    """Runs a graph on sample inputs with some weights replaced; measures its outputs' error.

    The error of a run is the mean over the float outputs of ||ref - out||^2 / ||ref||^2
    (each output normalized by itself, so logits and cached keys weigh alike), summed over
    the sample calls; `sqnr_db` turns it into -10 log10 of that mean.
    """

    def __init__(self, gm: fx.GraphModule, facts: GraphFacts, samples: Sequence[Sequence[Any]]):
        self.gm, self.facts = gm, facts
        self.index = {gi.name: gi.index for gi in facts.inputs if gi.kind in ("parameter", "buffer")}
        self.forwards = 0
        self.calls, self.reference = [], []
        for sample in samples:
            args = self._fit(facts, sample)
            if args is None:
                continue
            try:  # a graph traced for other sizes may not run on this sample
                ref = self._outputs(args, {})
            except Exception:  # noqa: BLE001 - any failure means: this sample does not fit
                continue
            self.calls.append(args)
            self.reference.append(ref)
        self.skipped = len(samples) - len(self.calls)

    @staticmethod
    def _fit(facts: GraphFacts, sample: Sequence[Any]) -> list[Any] | None:
        """The graph's full argument list with `sample`'s inputs, or None if they do not fit.

        The calibration's graph may differ in its size arguments (Dynamo makes a recompiled
        graph dynamic): then its tensors are matched alone, on a graph without size inputs.
        A sample whose shapes the graph was not traced for is tried anyway (a graph that
        bakes those sizes fails on it, and the caller drops it).
        """
        free = [gi for gi in facts.inputs if gi.kind not in ("parameter", "buffer")]
        dynamic = any(gi.kind == "symint" for gi in free)
        if len(sample) != len(free):
            tensors = [v for v in sample if isinstance(v, torch.Tensor)]
            free = [gi for gi in free if gi.kind == "input"]
            if dynamic or len(tensors) != len(free):
                return None
            sample = tensors
        args = [gi.value for gi in facts.inputs]
        for gi, v in zip(free, sample):
            ex = gi.value
            if isinstance(ex, torch.Tensor) != isinstance(v, torch.Tensor) or (
                    isinstance(v, torch.Tensor) and (v.dtype != ex.dtype or v.dim() != ex.dim())):
                return None
            args[gi.index] = v.to(ex.device) if isinstance(v, torch.Tensor) else v
        return args

    def __bool__(self) -> bool:
        return bool(self.calls)

    def _outputs(self, args: list[Any], replace: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        run = [a.clone() if isinstance(a, torch.Tensor) and gi.kind == "input" else a
               for a, gi in zip(args, self.facts.inputs)]
        for name, value in replace.items():
            run[self.index[name]] = value
        self.forwards += 1
        with torch.no_grad():
            out = pytree.tree_leaves(self.gm(*run))
        return [o.detach().double() for o in out
                if isinstance(o, torch.Tensor) and o.is_floating_point()]

    def error2(self, replace: dict[str, torch.Tensor]) -> float:
        """Mean squared relative error of the float outputs with `replace`d weights."""
        num, den = None, None
        for args, ref in zip(self.calls, self.reference):
            out = self._outputs(args, replace)
            d = torch.stack([(r - o).pow(2).sum() for r, o in zip(ref, out)])
            n = torch.stack([r.pow(2).sum() for r in ref])
            num, den = (d, n) if num is None else (num + d, den + n)
        if num is None:
            return 0.0
        return (num / den.clamp_min(1e-300)).mean().item()


def measure_sensitivities(sites: Sequence[SiteOptions], e2e: EndToEnd,
                          probe: Callable[[SiteOptions, Candidate], dict[str, torch.Tensor]]
                          ) -> None:
    """Set each site's sensitivity from one end-to-end run with a probe candidate.

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
        s.sensitivity = e2e.error2(probe(s, cand)) / cand.error ** 2
        s.measured = True
