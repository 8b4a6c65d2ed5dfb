"""shift_add: weights as scaled sums of signed powers of two, so multiplies become shifts/adds.

Per site the pass chooses a primitive: keep multiplication (dense), or T = 1 .. max_terms
power-of-two terms per weight (4 bits each, packed two per byte, plus a scale per output channel
or per `group` input columns): the static counterpart of ShiftAddViT's mult/shift experts. The
fit is greedy residual terms with least-squares scales, and output-aware (GPTQ-style rounding
against the calibration's input moment) when calibrated; the math is in shift_add_math.py.
Rules: fixed `terms`, per-site `max_error`, a global `bytes_budget`, or an end-to-end
`min_sqnr_db`, the last two through the shared allocator with bytes as the cost. With no rule
the default is quality-bounded: `min_sqnr_db=25` with calibration samples, else the fewest
terms whose own error is at most 0.05 (output layers kept dense).
Weights that already are scaled sums of powers of two (a DeepShift model, in the graph or as
parameters) convert exactly, whatever the rule. A rewritten linear calls
`effc.shift_linear(x, codes, scale, bias, group)`, a conv `effc.shift_conv`, both decoding the
packed codes per call (weight memory really shrinks), or, with `cache_decoded=True`, the
library op on the weight decoded once (fast on CPU, no memory saved).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F

import effc.kernels.shift  # noqa: F401  (registers torch.ops.effc.shift_linear / shift_conv)
from effc.compiler.config import PassConfig, knob
from effc.compiler.graph_facts import copy_node_meta
from effc.compiler.report import SiteRow
from effc.passes.base import Pass, PassResult
from effc.passes.budget import (DEFAULT_MIN_SQNR_DB, Candidate, SiteOptions,
                                allocation_summary, candidate_details, choose, end_to_end,
                                output_sites)
from effc.passes.shift_add_math import ShiftFit, exact_codes, fit, pack, rel_error
from effc.passes.weight_sites import (Site, find_sites, replace_site, site_bias, still_built,
                                      tied_uses)

RULES = ("terms", "max_error", "bytes_budget", "min_sqnr_db")
ALLOCATED_RULES = ("bytes_budget", "min_sqnr_db")
DEFAULT_MAX_ERROR = 0.05
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclasses.dataclass(frozen=True)
class ShiftAddConfig(PassConfig):
    """shift_add's knobs: `options={"shift_add": effc.ShiftAddConfig(terms=2)}`."""

    option_key: ClassVar[str] = "shift_add"

    terms: int | None = knob(None, "fixed power-of-two terms per weight (4 bits each) at every "
                             "site; None: the rule chooses per site", min=1, max=3)
    max_terms: int = knob(3, "the most terms a rule may choose", min=1, max=3)
    max_error: float | None = knob(None, "fewest terms whose relative output error (weight "
                                   "error without calibration) is at most this", min=0.0,
                                   max=1.0, min_exclusive=True)
    bytes_budget: float | None = knob(None, "fraction of the eligible weights' bytes to keep, "
                                      "allocated across sites by end-to-end sensitivity",
                                      min=0.0, max=1.0, min_exclusive=True)
    min_sqnr_db: float | None = knob(None, "as few bytes as keep this output SQNR (dB) on the "
                                     "calibration's sample inputs (default 25 when no rule is "
                                     "given and samples exist)", min=0.0)
    group: int | None = knob(None, "one scale per this many input columns of a row (None: "
                             "one per output channel)", min=1)
    output_aware: bool = knob(True, "with calibration, round to minimize the layer's output "
                              "error (GPTQ-style), not the weight's")
    cache_decoded: bool = knob(False, "decode the codes once at compile time and run the "
                               "library op (faster on CPU; weight memory is not saved)")
    conv: bool = knob(True, "also take conv1d/conv2d sites")
    fold_bn: bool = knob(True, "fold an eval-mode BatchNorm into the conv/linear before it")
    sensitivity: Literal["end_to_end", "layer"] = knob(
        "end_to_end", "how bytes_budget / min_sqnr_db weigh a site's error: end_to_end: its "
        "measured effect on the graph's outputs (calibration needed); layer: its own error")
    max_forwards: int = knob(512, "bound on the graph runs that measure sensitivities", min=1)
    output_layers: Literal["auto"] | bool = knob(
        "auto", "sites that feed the main output directly: auto: the default rule takes them "
                "only when measured end to end; True: always; False: never")

    def validate(self, key: str) -> None:
        given = [r for r in RULES if getattr(self, r) is not None]
        if len(given) > 1:
            raise ValueError(f"effc option {key!r}: give one rule, got {', '.join(given)}; "
                             f"accepted rules: {', '.join(RULES)}")
        if self.terms is not None and self.terms > self.max_terms:
            raise ValueError(f"effc option {key + '.terms'!r}: {self.terms} is above "
                             f"max_terms={self.max_terms}")

    @property
    def rule(self) -> str:
        return next((r for r in RULES if getattr(self, r) is not None), "default")


@dataclasses.dataclass
class _Work:
    """One dense site on its way through the pass: its fits by number of terms."""

    site: Site
    fits: dict[int, ShiftFit]
    errors: dict[int, float]
    moment: torch.Tensor | None
    note: str
    options: SiteOptions | None = None
    # fits from the calibration rows outside the sample calls, so that measuring on the
    # samples (allocation) does not measure on the data the rounding was fitted to
    held_out: dict[int, ShiftFit] | None = None

    @property
    def choosing(self) -> dict[int, ShiftFit]:
        return self.held_out if self.held_out is not None else self.fits


class ShiftAddPass(Pass):
    """Power-of-two weights; see the module docstring."""

    name = "shift_add"
    config_cls = ShiftAddConfig
    rewrites_weights = True

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        cfg: ShiftAddConfig = self.config
        rows: list[SiteRow] = []
        work: list[_Work] = []
        allocated = cfg.rule in ALLOCATED_RULES + ("default",) and cfg.sensitivity == "end_to_end"
        e2e = end_to_end(gm, ctx, allocated=allocated, compensate=False)
        rule = cfg.rule if cfg.rule != "default" else ("min_sqnr_db" if e2e else "max_error")
        if rule == "min_sqnr_db" and e2e is None:
            rule = "max_error"
        sites = list(find_sites(gm, ctx.facts, fold_bn=cfg.fold_bn, computed=True))
        heads = output_sites(gm, {s.node for s in sites if isinstance(s, Site)})
        for site in sites:
            if isinstance(site, str):
                name, _, why = site.partition(": ")
                rows.append(SiteRow(self.name, name, "skipped", why))
                continue
            why = self._ineligible(site, ctx)
            if why:
                rows.append(self._skip(site, why))
                continue
            exact = exact_codes(site.matrix, cfg.max_terms)
            if exact is not None or site.computed:
                rows.append(self._exact(gm, ctx, site, exact))
            elif site.node in heads and (cfg.output_layers is False or (
                    cfg.output_layers == "auto" and cfg.rule == "default" and e2e is None)):
                rows.append(self._skip(site, "output layer (feeds the main output directly): "
                                             "the default keeps it dense without end-to-end "
                                             "measurements (calibrate with sample inputs, ask "
                                             "for a rule, or set output_layers=True)"))
            else:
                work.append(self._fit(site, ctx, rule, e2e))
        chosen = self._choose(work, rule, e2e, ctx)
        for w in work:
            terms, why = chosen[w.site.weight_name]
            denied = ctx.claim(w.site.weight_name, w.site.sources) if terms else None
            if terms is None or denied:
                rows.append(self._skip(w.site, why or denied, w.options))
            else:
                rows.append(self._rewrite(gm, ctx, w.site, w.fits[terms], w.note, w.moment,
                                          w.options, why, w.errors))
        self._summarize(rows, ctx)
        return PassResult(rows)

    # --- decisions -------------------------------------------------------------------------
    def _ineligible(self, site: Site, ctx) -> str:
        if not ctx.selected(site.weight_name):
            return "excluded by include/exclude filters"
        if site.kind == "conv" and not self.config.conv:
            return "conv sites are off (conv=False)"
        return tied_uses(site, ctx.facts)

    def _fit(self, site: Site, ctx, rule: str, e2e) -> _Work:
        cfg: ShiftAddConfig = self.config
        moment, note = None, "weight-error rounding (no calibration given)"
        use = None
        if ctx.calibration is not None:
            moment, why = ctx.calibration.lookup(site.weight_name, tuple(site.weight.shape))
            if moment is not None and moment.shape != (site.n, site.n):
                moment, why = None, f"calibration moment is {tuple(moment.shape)}"
            if moment is not None and cfg.output_aware:
                use = moment
            note = ("output-aware rounding (calibration)" if use is not None else
                    f"weight-error rounding ({why or 'output_aware=False'})")
        if site.bn is not None:
            note += "; BatchNorm folded"
        wanted = [cfg.terms] if rule == "terms" else range(1, cfg.max_terms + 1)
        fits = {t: fit(site.matrix, t, cfg.group, use) for t in wanted}
        held = None
        if use is not None and rule in ALLOCATED_RULES and e2e is not None and \
                e2e.source == "samples":
            rest = ctx.calibration.held_out_moment(site.weight_name)
            if rest is not None and rest.shape == use.shape:
                held = {t: fit(site.matrix, t, cfg.group, rest) for t in wanted}
        errors = {t: rel_error(site.matrix, f.matrix(), moment)
                  for t, f in (held or fits).items()}
        return _Work(site, fits, errors, moment, note, held_out=held)

    def _choose(self, work: list[_Work], rule: str, e2e, ctx
                ) -> dict[str, tuple[int | None, str]]:
        cfg: ShiftAddConfig = self.config
        if rule in ALLOCATED_RULES:
            return self._allocate(work, rule, e2e, ctx)
        out: dict[str, tuple[int | None, str]] = {}
        if rule == "terms":
            return {w.site.weight_name: (cfg.terms, f"terms={cfg.terms} asked for")
                    for w in work}
        bound = cfg.max_error if cfg.max_error is not None else DEFAULT_MAX_ERROR
        label = "max_error" if cfg.rule != "default" else f"the default bound max_error={bound:g}"
        for w in work:
            ok = [t for t, e in sorted(w.errors.items()) if e <= bound]
            most = max(w.errors)
            out[w.site.weight_name] = (
                (ok[0], f"fewest terms within {label} ({w.errors[ok[0]]:.3g})") if ok else
                (None, f"multiplication kept: over {label} with {most} terms "
                       f"({w.errors[most]:.3g} relative error)"))
        if cfg.rule in ("default", "min_sqnr_db") and work:
            why = ("no calibration" if ctx.calibration is None
                   else "the calibration holds no sample inputs of this graph")
            ctx.note(f"shift_add: {why}, so sites meet a per-site error bound of {bound:g} "
                     f"instead of an end-to-end bound (bytes_budget asks for a size)")
        return out

    def _allocate(self, work: list[_Work], rule: str, e2e, ctx
                  ) -> dict[str, tuple[int | None, str]]:
        cfg: ShiftAddConfig = self.config
        by_key = {w.site.weight_name: w for w in work}
        options = []
        for w in work:
            size = w.site.weight.element_size()
            dense = Candidate(None, w.site.m * w.site.n, 0.0, bytes=w.site.m * w.site.n * size)
            w.options = SiteOptions(w.site.weight_name, [
                Candidate(t, w.site.m * w.site.n, w.errors[t], bytes=f.bytes(size))
                for t, f in sorted(w.fits.items())] + [dense])
            options.append(w.options)
        if not options:
            return {}

        def realize(choice: dict[str, Candidate]) -> dict[str, torch.Tensor]:
            return {k: by_key[k].site.weight_from_matrix(by_key[k].choosing[c.choice].matrix())
                    for k, c in choice.items() if c.choice is not None}

        e2e_sens = cfg.sensitivity == "end_to_end"
        bound = None
        if rule == "bytes_budget":
            budget = cfg.bytes_budget * sum(o.candidates[-1].bytes for o in options)
            alloc = choose(options, e2e, ctx, pass_name=self.name, realize=realize,
                           max_params=budget, max_forwards=cfg.max_forwards,
                           end_to_end_sensitivity=e2e_sens, cost="bytes")
        else:
            bound = cfg.min_sqnr_db if cfg.min_sqnr_db is not None else DEFAULT_MIN_SQNR_DB
            alloc = choose(options, e2e, ctx, pass_name=self.name, realize=realize,
                           min_sqnr_db=bound, max_forwards=cfg.max_forwards,
                           end_to_end_sensitivity=e2e_sens, cost="bytes")
        aware = [w for w in work if w.moment is not None and cfg.output_aware]
        held_out = None if not aware else all(w.held_out is not None for w in aware)
        ctx.note(allocation_summary(self.name, rule, e2e, len(options), alloc,
                                    end_to_end_sensitivity=e2e_sens,
                                    held_out=held_out, bound=bound,
                                    default=cfg.rule == "default"))
        out = {}
        for s in options:
            c = alloc.choice[s.key]
            out[s.key] = ((c.choice, f"{c.choice} terms chosen by the {rule} allocator "
                                     f"(sensitivity {s.sensitivity:.3g})") if c.choice else
                          (None, f"multiplication kept by the {rule} allocator (3 terms "
                                 f"would cost {s.candidates[-2].error:.3g} relative error; "
                                 f"sensitivity {s.sensitivity:.3g})"))
        return out

    # --- rewriting -------------------------------------------------------------------------
    def _exact(self, gm, ctx, site: Site, exact: ShiftFit | None) -> SiteRow:
        computed = (f"weight computed in the graph from {', '.join(site.computed)}"
                    if site.computed else "weight")
        if exact is None:
            return self._skip(site, f"{computed}, not a scaled sum of at most "
                                    f"{self.config.max_terms} powers of two per element")
        denied = ctx.claim(site.weight_name, site.sources)
        if denied:
            return self._skip(site, denied)
        note = (f"{computed}: already a scaled sum of {exact.terms} powers of two per element "
                f"(exact)" + still_built(site))
        return self._rewrite(gm, ctx, site, exact, note, None, None, "exact")

    def _skip(self, site: Site, why: str, options: SiteOptions | None = None) -> SiteRow:
        size = site.m * site.n
        details = {"primitive": "multiply"}
        if options is not None:
            details.update(candidate_details(options))
        return SiteRow(self.name, site.weight_name, "skipped", why, size, size,
                       details=details)

    def _rewrite(self, gm, ctx, site: Site, f: ShiftFit, note: str,
                 moment: torch.Tensor | None, options: SiteOptions | None, why: str,
                 errors: dict[int, float] | None = None) -> SiteRow:
        cfg: ShiftAddConfig = self.config
        dtype, device = site.weight.dtype, site.weight.device
        hint = site.weight_name.removesuffix(".weight")
        x, _ = site.operands()
        bias = site_bias(gm, ctx, site, f"{hint}.shift_bias")
        approx = f.matrix()
        if cfg.cache_decoded:
            w = approx.to(device=device, dtype=dtype)   # [out, in]: what F.linear takes
            if site.kind == "conv":
                w = w.reshape(site.m, *site.weight.shape[1:])
            node = ctx.add_constant(gm, w.contiguous(), derived_from=site.sources,
                                    name_hint=f"{hint}.shift_decoded")
            args = (x, node, bias, *site.conv_args) if site.kind == "conv" else (x, node, bias)
            target = _CONV[site.weight.dim() - 2] if site.kind == "conv" else F.linear
            decoded = "decoded once at compile time (runtime weight memory is not saved)"
        else:
            codes = ctx.add_constant(gm, pack(f.codes).to(device).contiguous(),
                                     derived_from=site.sources, name_hint=f"{hint}.shift_codes")
            scale = ctx.add_constant(gm, f.scale.to(device=device, dtype=dtype).contiguous(),
                                     derived_from=site.sources, name_hint=f"{hint}.shift_scale")
            group = f.group or 0
            if site.kind == "conv":
                target = torch.ops.effc.shift_conv.default
                args = (x, codes, scale, bias, group, list(site.weight.shape[2:]),
                        *site.conv_args)
            else:
                target, args = torch.ops.effc.shift_linear.default, (x, codes, scale, bias, group)
            decoded = "decoded per call from the packed codes"
        with gm.graph.inserting_before(site.node):
            new = gm.graph.call_function(target, args)
        copy_node_meta(new, site.output)
        replace_site(gm, site, new)
        size = site.m * site.n
        error = {"weight_rel_fro": rel_error(site.matrix, approx, None)}
        if moment is not None:
            error["out_rel_fro"] = rel_error(site.matrix, approx, moment)
        elem = site.weight.element_size()
        details: dict[str, Any] = {
            "kind": site.kind, "primitive": f"shift ({f.terms} terms)", "terms": f.terms,
            "why": why, "shape": [site.m, site.n], "group": f.group,
            "bits_per_weight": 4 * f.terms, "bytes_before": size * elem,
            "bytes_after": f.bytes(elem), "weight": decoded}
        if errors:
            details["error_at_terms"] = {str(t): round(e, 6) for t, e in errors.items()}
        if site.computed:
            details["computed_from"] = list(site.computed)
        if site.bn is not None:
            details["batch_norm_folded"] = site.bn.node.name
        if options is not None:
            details.update(candidate_details(options))
        return SiteRow(self.name, site.weight_name, "rewritten", f"{note}; {decoded}", size,
                       size, error=error, details=details)

    def _summarize(self, rows: list[SiteRow], ctx) -> None:
        done = [r for r in rows if r.decision == "rewritten"]
        if done:
            before = sum(r.details["bytes_before"] for r in done)
            after = sum(r.details["bytes_after"] for r in done)
            cached = sum(self.config.cache_decoded for _ in done)
            ctx.note(f"shift_add: weight bytes of the {len(done)} rewritten sites {before} -> "
                     f"{after} ({after / before:.1%})" + (
                         "; decoded once at compile time (cache_decoded), so runtime weight "
                         "memory is not saved" if cached else "; decoded per call"))
