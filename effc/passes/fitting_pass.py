"""The flow the fitting weight passes share (hypercomplex, shift_add): one `run`, pass hooks.

Per graph: find the weight sites (weight_sites.py, computed weights included); skip what the
filters, the `conv` knob or tied weights exclude; rewrite exactly what already has the pass's
structure (a trained PHM layer, a DeepShift weight); keep output layers dense under the
default rule when nothing is measured end to end; fit every other site; choose per site by
the rule: a fixed choice or a per-site `max_error` (`local_choice`), or a global budget or
`min_sqnr_db` through the shared allocator (budget.py: candidates, end-to-end sensitivity,
`choose`), with the pass's cost unit (parameters or bytes); then claim and rewrite.
A pass supplies the hooks below and its config: `rule` (the rule given, or "default"),
`min_sqnr_db`, the budget knob, `conv`, `fold_bn`, `sensitivity`, `max_forwards`,
`output_layers`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

from effc.compiler.config import PassConfig, knob
from effc.compiler.report import SiteRow
from effc.passes.base import Pass, PassResult
from effc.passes.budget import (DEFAULT_MIN_SQNR_DB, Candidate, SiteOptions,
                                allocation_summary, candidate_details, choose, end_to_end,
                                output_sites)
from effc.passes.weight_sites import Site, find_sites, skip_reason, still_built

DEFAULT_MAX_ERROR = 0.05  # the default's per-site bound when nothing is measured end to end
HEAD_REASON = ("output layer (feeds the main output directly): the default keeps it dense "
               "without end-to-end measurements (calibrate with sample inputs, ask for a rule, "
               "or set output_layers=True)")


@dataclasses.dataclass(frozen=True)
class FittingConfig(PassConfig):
    """The knobs every fitting pass has; a pass adds its own and lists its RULES (at most one
    may be given; none means the quality-bounded default)."""

    RULES: ClassVar[tuple[str, ...]] = ()

    max_error: float | None = knob(None, "the least cost whose relative output error (weight "
                                   "error without calibration) is at most this", min=0.0,
                                   max=1.0, min_exclusive=True)
    min_sqnr_db: float | None = knob(None, "as little cost as keeps the graph's outputs at this "
                                     "SQNR (dB) on the calibration's sample inputs (default 25 "
                                     "when no rule is given and samples exist)", min=0.0)
    conv: bool = knob(True, "also take conv1d/conv2d sites (grouped convs are skipped)")
    fold_bn: bool = knob(True, "fold an eval-mode BatchNorm into the dense conv/linear before it")
    sensitivity: Literal["end_to_end", "layer"] = knob(
        "end_to_end", "how the budget and min_sqnr_db weigh a site's error: end_to_end: its "
        "measured effect on the graph's outputs (calibration needed); layer: its own error")
    max_forwards: int = knob(512, "bound on the graph runs that measure sensitivities", min=1)
    output_layers: Literal["auto"] | bool = knob(
        "auto", "sites that feed the main output directly: auto: the default rule takes them "
                "only when measured end to end; True: always; False: never")
    shrinkage: Literal["auto"] | float = knob(
        "auto", "fraction of the calibration moment a site is fitted with that is replaced by "
                "the identity of the same trace (as low_rank's); auto: input features / "
                "calibration rows, at most 0.3", min=0.0, max=1.0)

    def validate(self, key: str) -> None:
        given = [r for r in self.RULES if getattr(self, r) is not None]
        if len(given) > 1:
            raise ValueError(f"effc option {key!r}: give one rule, got {', '.join(given)}; "
                             f"accepted rules: {', '.join(self.RULES)}")

    @property
    def rule(self) -> str:
        """The rule given, or "default" (quality-bounded) when none is."""
        return next((r for r in self.RULES if getattr(self, r) is not None), "default")


@dataclasses.dataclass
class Fitted:
    """A dense site on its way through a fitting pass."""

    site: Site
    moment: torch.Tensor | None   # E[x x^T] of the site's input (calibration), if any
    note: str
    fit: Any                      # the pass's own: a KroneckerFit, fits by number of terms
    held_out: Any = None          # the same, fitted without the calibration's sample calls
    options: SiteOptions | None = None

    @property
    def choosing(self) -> Any:
        """What choices are measured with: the held-out fit when there is one."""
        return self.held_out if self.held_out is not None else self.fit


class FittingPass(Pass):
    """A weight pass that fits each site and chooses per site; see the module docstring."""

    rewrites_weights = True
    ALLOCATED_RULES: ClassVar[tuple[str, ...]] = ()
    BUDGET: ClassVar[str] = "param_budget"   # the allocated rule that is a budget
    COST: ClassVar[str] = "params"           # what the budget counts: "params" or "bytes"

    # --- hooks -----------------------------------------------------------------------------
    def ineligible(self, site: Site, ctx) -> str:
        """Why the pass cannot fit this dense site ("" if it can), beyond the shared checks."""
        return ""

    def structured(self, gm: fx.GraphModule, ctx, site: Site) -> SiteRow | None:
        """The row of an exact rewrite of a site that already has the pass's structure (or of
        a computed weight that does not: skipped), or None to fit the site."""
        raise NotImplementedError

    def fit_site(self, site: Site, ctx, rule: str, e2e) -> Fitted | str:
        """The site's fits, or why it could not be fitted."""
        raise NotImplementedError

    def candidates(self, w: Fitted) -> list[Candidate]:
        """The lossy candidates of a site (dense is added), errors from `w.choosing`."""
        raise NotImplementedError

    def approx(self, fit: Any, choice: Any) -> torch.Tensor:
        """The [m, n] matrix a choice of `fit` stands for."""
        raise NotImplementedError

    def local_choice(self, w: Fitted, rule: str, bound: float, label: str
                     ) -> tuple[Any | None, str]:
        """(choice, why) of the fixed rule, or the fewest cost within `bound`, or (None, why)."""
        raise NotImplementedError

    def rewrite(self, gm: fx.GraphModule, ctx, w: Fitted, choice: Any, why: str) -> SiteRow:
        raise NotImplementedError

    def exact(self, gm: fx.GraphModule, ctx, site: Site, note: str, fit: Any, choice: Any
              ) -> SiteRow:
        """Claim and rewrite a site whose weight already has the pass's structure (`fit`,
        exact); `note` says what it is, and the row adds whether W is still built."""
        denied = ctx.claim(site.weight_name, site.sources)
        if denied:
            return self.skip(site, denied)
        return self.rewrite(gm, ctx, Fitted(site, None, note + still_built(site), fit), choice,
                            "exact")

    @staticmethod
    def provenance(site: Site, options: SiteOptions | None) -> dict[str, Any]:
        """A rewritten row's details every fitting pass reports: what a computed weight is
        made of, the BatchNorm folded into it, and the candidates the allocator chose among."""
        out: dict[str, Any] = {}
        if site.computed:
            out["computed_from"] = list(site.computed)
        if site.bn is not None:
            out["batch_norm_folded"] = site.bn.node.name
        if options is not None:
            out.update(candidate_details(options))
        return out

    def skip(self, site: Site, why: str, options: SiteOptions | None = None) -> SiteRow:
        size = site.m * site.n
        details = {} if options is None else candidate_details(options)
        return SiteRow(self.name, site.weight_name, "skipped", why, size, size, details=details)

    def finish(self, rows: list[SiteRow], ctx) -> None:
        """After the graph: a per-graph note, if the pass has one."""

    # --- the flow --------------------------------------------------------------------------
    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        cfg = self.config
        allocated = (cfg.rule in self.ALLOCATED_RULES + ("default",)
                     and cfg.sensitivity == "end_to_end")
        e2e = end_to_end(gm, ctx, allocated=allocated, compensate=False)
        rule = cfg.rule if cfg.rule != "default" else ("min_sqnr_db" if e2e else "max_error")
        if rule == "min_sqnr_db" and e2e is None:
            rule = "max_error"
        sites = list(find_sites(gm, ctx.facts, fold_bn=cfg.fold_bn, computed=True))
        heads = output_sites(gm, {s.node for s in sites if isinstance(s, Site)})
        rows: list[SiteRow] = []
        work: list[Fitted] = []
        for site in sites:
            if isinstance(site, str):
                name, _, why = site.partition(": ")
                rows.append(SiteRow(self.name, name, "skipped", why))
                continue
            why = skip_reason(site, ctx, cfg.conv)
            exact = None if why else self.structured(gm, ctx, site)
            if why or exact is not None:
                rows.append(exact or self.skip(site, why))
                continue
            why = self.ineligible(site, ctx)
            if not why and site.node in heads and (cfg.output_layers is False or (
                    cfg.output_layers == "auto" and cfg.rule == "default" and e2e is None)):
                why = HEAD_REASON
            w = self.fit_site(site, ctx, rule, e2e) if not why else why
            if isinstance(w, str):
                rows.append(self.skip(site, w))
            else:
                work.append(w)
        chosen = (self._allocate(work, rule, e2e, ctx) if rule in self.ALLOCATED_RULES
                  else self._local(work, rule, ctx))
        for w in work:
            choice, why = chosen[w.site.weight_name]
            denied = ctx.claim(w.site.weight_name, w.site.sources) if choice else None
            if choice is None or denied:
                rows.append(self.skip(w.site, denied or why, w.options))
            else:
                rows.append(self.rewrite(gm, ctx, w, choice, why))
        self.finish(rows, ctx)
        return PassResult(rows)

    def moment(self, site: Site, ctx) -> tuple[torch.Tensor | None, str]:
        """(E[x x^T] of the site's input, "") from the calibration, or (None, why not)."""
        if ctx.calibration is None:
            return None, "no calibration given"
        moment, why = ctx.calibration.lookup(site.weight_name, tuple(site.weight.shape))
        if moment is not None and moment.shape != (site.n, site.n):
            return None, f"calibration moment is {tuple(moment.shape)}"
        return moment, why

    def whitening(self, site: Site, ctx, held_out: bool = False) -> torch.Tensor | None:
        """The moment a site is fitted with: E[x x^T] (over the non-sample calls with
        `held_out`) shrunk per the `shrinkage` knob; None when the calibration lacks it."""
        m = ctx.calibration.whitening_moment(site.weight_name, self.config.shrinkage, held_out)
        return m if m is not None and m.shape == (site.n, site.n) else None

    def _local(self, work: list[Fitted], rule: str, ctx) -> dict[str, tuple[Any, str]]:
        cfg = self.config
        bound = cfg.max_error if cfg.max_error is not None else DEFAULT_MAX_ERROR
        label = "max_error" if cfg.rule != "default" else f"the default bound max_error={bound:g}"
        out = {w.site.weight_name: self.local_choice(w, rule, bound, label) for w in work}
        if cfg.rule in ("default", "min_sqnr_db") and work:
            why = ("no calibration" if ctx.calibration is None
                   else "the calibration holds no sample inputs of this graph")
            ctx.note(f"{self.name}: {why}, so sites meet a per-site error bound of {bound:g} "
                     f"instead of an end-to-end bound ({self.BUDGET} asks for a size)")
        return out

    def _allocate(self, work: list[Fitted], rule: str, e2e, ctx
                  ) -> dict[str, tuple[Any, str]]:
        cfg = self.config
        out: dict[str, tuple[Any, str]] = {}
        options = []
        for w in work:
            size = w.site.weight.element_size()
            dense = Candidate(None, w.site.m * w.site.n, 0.0, bytes=w.site.m * w.site.n * size)
            w.options = SiteOptions(w.site.weight_name, self.candidates(w) + [dense])
            if len(w.options.candidates) == 1:
                out[w.site.weight_name] = (None, "no candidate saves anything at this site")
            else:
                options.append(w.options)
        if not options:
            return out
        by_key = {w.site.weight_name: w for w in work}

        def realize(choice: dict[str, Candidate]) -> dict[str, torch.Tensor]:
            return {k: by_key[k].site.weight_from_matrix(self.approx(by_key[k].choosing,
                                                                     c.choice))
                    for k, c in choice.items() if c.choice is not None}

        e2e_sens = cfg.sensitivity == "end_to_end"
        common = dict(pass_name=self.name, realize=realize, max_forwards=cfg.max_forwards,
                      end_to_end_sensitivity=e2e_sens, cost=self.COST)
        bound = None
        if rule == self.BUDGET:
            total = sum(getattr(o.candidates[-1], self.COST) for o in options)
            alloc = choose(options, e2e, ctx, max_params=getattr(cfg, self.BUDGET) * total,
                           **common)
        else:
            bound = cfg.min_sqnr_db if cfg.min_sqnr_db is not None else DEFAULT_MIN_SQNR_DB
            alloc = choose(options, e2e, ctx, min_sqnr_db=bound, **common)
        aware = [w for w in work if w.options in options and w.moment is not None]
        held_out = None if not aware else all(w.held_out is not None for w in aware)
        ctx.note(allocation_summary(self.name, rule, e2e, len(options), alloc,
                                    end_to_end_sensitivity=e2e_sens, held_out=held_out,
                                    bound=bound, default=cfg.rule == "default",
                                    budget=self.BUDGET))
        for s in options:
            c = alloc.choice[s.key]
            if c.choice is not None:
                out[s.key] = (c.choice, f"chosen by the {rule} allocator (sensitivity "
                                        f"{s.sensitivity:.3g})")
                continue
            best = min(s.candidates[:-1], key=lambda c: c.error)
            out[s.key] = (None, f"kept dense by the {rule} allocator (its best candidate, "
                                f"{best.choice}, keeps {best.params / s.candidates[-1].params:.0%}"
                                f" of the parameters and {best.bytes / s.candidates[-1].bytes:.0%}"
                                f" of the bytes at {best.error:.3g} relative error; sensitivity "
                                f"{s.sensitivity:.3g})")
        return out
