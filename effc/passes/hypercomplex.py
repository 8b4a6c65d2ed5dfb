"""hypercomplex: weights as sums of Kronecker products (PHM linear, PHC conv; PHNNs).

Two jobs, in order of value:
1. Trained PHM/PHC models, losslessly faster. A linear/conv whose weight is computed in the
   graph from weights alone (the Kronecker-sum subgraph, however it is written) is evaluated
   at compile time; if it is a sum of T <= n Kronecker products (checked for every n in
   2, 3, 4, 8, 16 that divides it, with the tail at rounding level) the call becomes
   `effc.phm_linear` / `effc.phm_conv` with the factors, and the dense W is no longer
   built at run time. Always on (exact); the stale guard watches the weights W is made of.
2. Dense weights, budgeted. The optimal T-term fit (Van Loan-Pitsianis, hypercomplex_math.py),
   activation-aware when calibrated. Rules: fixed `terms`, per-site `max_error`, a global
   `param_budget`, or an end-to-end `min_sqnr_db`, chosen by the shared allocator. With no
   rule the default is quality-bounded, like low_rank's: `min_sqnr_db=25` with calibration
   samples, else a per-site `max_error` of 0.05 (and output layers dense).
Sites come from the shared finder (weight_sites.py), BatchNorm folded into dense sites.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

import effc.kernels.phm  # noqa: F401  (registers torch.ops.effc.phm_linear)
import effc.kernels.phm_conv  # noqa: F401  (registers torch.ops.effc.phm_conv)
from effc.compiler.config import PassConfig, knob
from effc.compiler.graph_facts import copy_node_meta
from effc.compiler.report import SiteRow
from effc.passes.base import Pass, PassResult
from effc.passes.budget import (DEFAULT_MIN_SQNR_DB, Candidate, SiteOptions,
                                allocation_summary, candidate_details, choose, end_to_end,
                                output_sites)
from effc.passes.hypercomplex_math import (N_CHOICES, KroneckerFit, kronecker_fit,
                                           kronecker_structure, max_terms, params)
from effc.passes.low_rank_math import output_error, weight_error
from effc.passes.weight_sites import (Site, find_sites, replace_site, site_bias, site_rows,
                                      still_built, tied_uses)

RULES = ("terms", "max_error", "param_budget", "min_sqnr_db")
ALLOCATED_RULES = ("param_budget", "min_sqnr_db")
DEFAULT_MAX_ERROR = 0.05


@dataclasses.dataclass(frozen=True)
class HypercomplexConfig(PassConfig):
    """hypercomplex's knobs: `options={"hypercomplex": effc.HypercomplexConfig(n=4)}`."""

    option_key: ClassVar[str] = "hypercomplex"

    n: Literal[2, 3, 4, 8, 16] = knob(4, "the hypercomplex dimension of fitted dense weights "
                                      "(A_t: n x n, S_t: out/n x in/n); trained PHM layers are "
                                      "recognized at whichever n they have")
    terms: int | None = knob(None, "fixed number of Kronecker terms per fitted site (a PHM "
                             "layer has n); None: the rule chooses per site", min=1)
    max_error: float | None = knob(None, "fewest terms whose relative output error (weight "
                                   "error without calibration) is at most this", min=0.0,
                                   max=1.0, min_exclusive=True)
    param_budget: float | None = knob(None, "fraction of the eligible weights' parameters to "
                                      "keep, allocated across sites by end-to-end sensitivity",
                                      min=0.0, max=1.0, min_exclusive=True)
    min_sqnr_db: float | None = knob(None, "fit as far as the graph's outputs keep this SQNR "
                                     "(dB) on the calibration's sample inputs (default 25 "
                                     "when no rule is given and samples exist)", min=0.0)
    min_saving: float = knob(0.1, "rewrite a fitted site only if it keeps at most "
                             "(1 - min_saving) of its parameters", min=0.0, max=0.99)
    whiten: bool = knob(True, "fit to the layer's outputs on the calibration inputs (input "
                        "covariance approximated by its nearest Kronecker product)")
    conv: bool = knob(True, "also take conv1d/conv2d sites (PHC)")
    fold_bn: bool = knob(True, "fold an eval-mode BatchNorm into a dense conv/linear before it")
    sensitivity: Literal["end_to_end", "layer"] = knob(
        "end_to_end", "how param_budget / min_sqnr_db weigh a site's error: end_to_end: its "
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

    @property
    def rule(self) -> str:
        return next((r for r in RULES if getattr(self, r) is not None), "default")


@dataclasses.dataclass
class _Work:
    """One dense site on its way through the pass."""

    site: Site
    fit: KroneckerFit
    moment: torch.Tensor | None
    note: str
    options: SiteOptions | None = None


class HypercomplexPass(Pass):
    """Kronecker-sum rewrites; see the module docstring."""

    name = "hypercomplex"
    config_cls = HypercomplexConfig
    rewrites_weights = True

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        cfg: HypercomplexConfig = self.config
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
            why = self._ineligible(site, ctx, site.node in heads, e2e)
            if why:
                rows.append(self._skip(site, why))
            elif site.computed:
                rows.append(self._structured(gm, ctx, site))
            else:
                w = self._fit(site, ctx)
                if isinstance(w, str):
                    rows.append(self._skip(site, w))
                else:
                    work.append(w)
        chosen = self._choose(work, rule, e2e, ctx)
        for w in work:
            terms, why = chosen[w.site.weight_name]
            denied = ctx.claim(w.site.weight_name, w.site.sources) if terms else None
            if terms is None or denied:
                rows.append(self._skip(w.site, why or denied, w.options))
            else:
                rows.append(self._rewrite(gm, ctx, w.site, w.fit, terms, w.note, w.moment,
                                          w.options))
        return PassResult(rows)

    # --- decisions -------------------------------------------------------------------------
    def _ineligible(self, site: Site, ctx, head: bool, e2e) -> str:
        cfg: HypercomplexConfig = self.config
        if not ctx.selected(site.weight_name):
            return "excluded by include/exclude filters"
        if site.kind == "conv" and not cfg.conv:
            return "conv sites are off (conv=False)"
        tied = tied_uses(site, ctx.facts)
        if tied or site.computed:
            return tied
        n, cin = cfg.n, site.weight.shape[1] if site.kind == "conv" else site.n
        if site.m % n or cin % n:
            return (f"n={n} does not divide the weight's {'channels' if site.kind == 'conv' else 'shape'}"
                    f" ({site.m} out, {cin} in)")
        if max_terms(site.m, site.n, n, cfg.min_saving) < 1:
            return f"too small to save parameters at n={n} ({site.m}x{site.n})"
        if head and (cfg.output_layers is False or (
                cfg.output_layers == "auto" and cfg.rule == "default" and e2e is None)):
            return ("output layer (feeds the main output directly): the default keeps it "
                    "dense without end-to-end measurements (calibrate with sample inputs, ask "
                    "for a rule, or set output_layers=True)")
        return ""

    def _fit(self, site: Site, ctx) -> _Work | str:
        cfg: HypercomplexConfig = self.config
        moment, note = None, "plain Kronecker fit (no calibration given)"
        if ctx.calibration is not None:
            moment, why = ctx.calibration.lookup(site.weight_name, tuple(site.weight.shape))
            if moment is not None and moment.shape != (site.n, site.n):
                moment, why = None, f"calibration moment is {tuple(moment.shape)}"
            note = ("Kronecker fit whitened by the calibration" if moment is not None and
                    cfg.whiten else f"plain Kronecker fit ({why or 'whiten=False'})")
        if site.bn is not None:
            note += "; BatchNorm folded"
        try:
            fit = kronecker_fit(site.matrix, cfg.n, moment if cfg.whiten else None)
        except (RuntimeError, ValueError) as exc:
            if ctx.config.strict:
                raise
            return f"Kronecker fit failed: {exc}"
        return _Work(site, fit, moment, note)

    def _choose(self, work: list[_Work], rule: str, e2e, ctx
                ) -> dict[str, tuple[int | None, str]]:
        cfg: HypercomplexConfig = self.config
        out: dict[str, tuple[int | None, str]] = {}
        if rule in ALLOCATED_RULES:
            return self._allocate(work, rule, e2e, ctx)
        bound = cfg.max_error if cfg.max_error is not None else DEFAULT_MAX_ERROR
        label = rule if cfg.rule != "default" else f"the default bound max_error={bound:g}"
        for w in work:
            limit = max_terms(w.site.m, w.site.n, cfg.n, cfg.min_saving)
            err = w.fit.tail_rel_error()
            if rule == "terms":
                t = cfg.terms
                out[w.site.weight_name] = ((t, "") if t <= limit else (
                    None, f"not profitable: terms={t} is above {limit}, the most that keep "
                          f"{1 - cfg.min_saving:g} of the parameters at n={cfg.n}"))
                continue
            ok = [t for t in range(1, limit + 1) if err[t] <= bound]
            t = ok[0] if ok else None
            if t is not None and w.moment is not None:  # the curve is exact only for
                while t <= limit and self._out_error(w, t) > bound:  # Kronecker inputs
                    t += 1
                t = t if t <= limit else None
            out[w.site.weight_name] = (t, "") if t else (
                None, f"over {label}: {err[limit].item():.3g} relative error at the most "
                      f"profitable {limit} terms (n={cfg.n})")
        if cfg.rule in ("default", "min_sqnr_db") and work:
            why = ("no calibration" if ctx.calibration is None
                   else "the calibration holds no sample inputs of this graph")
            ctx.note(f"hypercomplex: {why}, so fitted sites meet a per-site error bound of "
                     f"{bound:g} instead of an end-to-end bound; dense pretrained weights are "
                     f"rarely that close to a Kronecker sum (param_budget asks for a size)")
        return out

    def _out_error(self, w: _Work, terms: int) -> float:
        approx = w.fit.matrix(terms)
        eye = torch.eye(w.site.n, dtype=torch.float64, device=approx.device)
        return output_error(w.site.matrix, approx, eye, w.moment)["out_rel_fro"]

    def _allocate(self, work: list[_Work], rule: str, e2e, ctx
                  ) -> dict[str, tuple[int | None, str]]:
        cfg: HypercomplexConfig = self.config
        out: dict[str, tuple[int | None, str]] = {}
        options = []
        for w in work:
            w.options = self._candidates(w)
            if len(w.options.candidates) == 1:
                out[w.site.weight_name] = (None, f"not profitable at n={cfg.n}")
            else:
                options.append(w.options)
        if not options:
            return out
        by_key = {w.site.weight_name: w for w in work}

        def realize(choice: dict[str, Candidate]) -> dict[str, torch.Tensor]:
            return {k: by_key[k].site.weight_from_matrix(by_key[k].fit.matrix(c.choice))
                    for k, c in choice.items() if c.choice is not None}

        e2e_sens = cfg.sensitivity == "end_to_end"
        bound = None
        if rule == "param_budget":
            budget = cfg.param_budget * sum(w.site.m * w.site.n for w in work)
            budget -= sum(w.site.m * w.site.n for w in work if w.site.weight_name in out)
            alloc = choose(options, e2e, ctx, pass_name=self.name, realize=realize,
                           max_params=budget, max_forwards=cfg.max_forwards,
                           end_to_end_sensitivity=e2e_sens)
        else:
            bound = cfg.min_sqnr_db if cfg.min_sqnr_db is not None else DEFAULT_MIN_SQNR_DB
            alloc = choose(options, e2e, ctx, pass_name=self.name, realize=realize,
                           min_sqnr_db=bound, max_forwards=cfg.max_forwards,
                           end_to_end_sensitivity=e2e_sens)
        whitened = any(w.fit.whitened for w in work)
        ctx.note(allocation_summary(self.name, rule, e2e, len(options), alloc,
                                    end_to_end_sensitivity=e2e_sens,
                                    held_out=False if whitened else None, bound=bound,
                                    default=cfg.rule == "default"))
        for s in options:
            c = alloc.choice[s.key]
            best = max(s.candidates[:-1], key=lambda c: c.choice)
            out[s.key] = ((c.choice, "") if c.choice is not None else
                          (None, f"kept dense by the {rule} allocator (its largest fit, "
                                 f"{best.choice} terms, keeps {best.params / s.candidates[-1].params:.0%}"
                                 f" of the parameters at {best.error:.3g} relative error; "
                                 f"sensitivity {s.sensitivity:.3g})"))
        return out

    def _candidates(self, w: _Work) -> SiteOptions:
        """T = 1 .. the most profitable number of terms, and dense."""
        site, cfg = w.site, self.config
        err, size = w.fit.tail_rel_error(), site.weight.element_size()
        dense = Candidate(None, site.m * site.n, 0.0, bytes=site.m * site.n * size,
                          flops=_flops(site, None))
        cands = []
        for t in range(1, max_terms(site.m, site.n, cfg.n, cfg.min_saving) + 1):
            cost = params(site.m, site.n, cfg.n, t)
            cands.append(Candidate(t, cost, err[t].item(), bytes=cost * size,
                                   flops=_flops(site, t, cfg.n)))
        return SiteOptions(site.weight_name, cands + [dense])

    def _structured(self, gm: fx.GraphModule, ctx, site: Site) -> SiteRow:
        """A weight computed in the graph: rewritten exactly if it is a Kronecker sum."""
        cin = site.weight.shape[1] if site.kind == "conv" else None
        found = kronecker_structure(site.matrix, in_features=cin)
        computed = f"weight computed in the graph from {', '.join(site.computed)}"
        if found is None:
            return self._skip(site, f"{computed}, not a sum of at most n Kronecker products "
                                    f"for any n in {N_CHOICES} dividing it")
        denied = ctx.claim(site.weight_name, site.sources)
        if denied:
            return self._skip(site, denied)
        fit, terms = found
        note = (f"{computed}: a sum of {terms} Kronecker products at n={fit.n} (exact)"
                + still_built(site))
        return self._rewrite(gm, ctx, site, fit, terms, note, None, None)

    # --- rewriting -------------------------------------------------------------------------
    def _skip(self, site: Site, why: str, options: SiteOptions | None = None) -> SiteRow:
        size, flops = site.m * site.n, _flops(site, None)
        details = {} if options is None else candidate_details(options)
        return SiteRow(self.name, site.weight_name, "skipped", why, size, size, flops, flops,
                       details=details)

    def _rewrite(self, gm, ctx, site: Site, fit: KroneckerFit, terms: int, note: str,
                 moment: torch.Tensor | None, options: SiteOptions | None) -> SiteRow:
        a64, s64 = fit.factors(terms)
        dtype, device = site.weight.dtype, site.weight.device
        a = a64.to(device=device, dtype=dtype).contiguous()
        if site.kind == "conv":
            s = s64.to(device=device, dtype=dtype).reshape(
                terms, fit.p, site.weight.shape[1] // fit.n, *site.weight.shape[2:]).contiguous()
        else:  # stored [p, T, q]-contiguous: phm_linear's stacked GEMM reads it as a free view
            s = s64.to(device=device, dtype=dtype).transpose(0, 1).contiguous().transpose(0, 1)
        hint = site.weight_name.removesuffix(".weight")
        a_node = ctx.add_constant(gm, a, derived_from=site.sources, name_hint=f"{hint}.phm_a")
        s_node = ctx.add_constant(gm, s, derived_from=site.sources, name_hint=f"{hint}.phm_s")
        x, _ = site.operands()
        bias = site_bias(gm, ctx, site, f"{hint}.phm_bias")
        with gm.graph.inserting_before(site.node):
            if site.kind == "conv":
                new = gm.graph.call_function(torch.ops.effc.phm_conv.default,
                                             (x, a_node, s_node, bias, *site.conv_args))
            else:
                new = gm.graph.call_function(torch.ops.effc.phm_linear.default,
                                             (x, a_node, s_node, bias))
        copy_node_meta(new, site.output)
        replace_site(gm, site, new)
        approx = fit.matrix(terms)
        eye = torch.eye(site.n, dtype=torch.float64, device=approx.device)
        error = weight_error(site.matrix, approx, eye)
        if moment is not None:
            error.update(output_error(site.matrix, approx, eye, moment))
        err = fit.tail_rel_error()
        details: dict[str, Any] = {
            "kind": site.kind, "n": fit.n, "terms": terms, "shape": [site.m, site.n],
            "rule": "structure" if site.computed else self.config.rule,
            ("out" if fit.whitened else "weight") + "_rel_fro_at_terms":
                {str(t): round(err[t].item(), 6) for t in range(1, min(len(err) - 1, 2 * terms) + 1)}}
        if site.computed:
            details["computed_from"] = list(site.computed)
        if site.bn is not None:
            details["batch_norm_folded"] = site.bn.node.name
        if options is not None:
            details.update(candidate_details(options))
        return SiteRow(self.name, site.weight_name, "rewritten", note, site.m * site.n,
                       params(site.m, site.n, fit.n, terms), _flops(site, None),
                       _flops(site, terms, fit.n), error, details)


def _flops(site: Site, terms: int | None, n: int = 1) -> int:
    """FLOPs of the example call: dense, or the PHM op's (one GEMM against the stacked S_t,
    then the n x n mixing; a conv builds its weight, then convolves)."""
    rows, m, k = site_rows(site), site.m, site.n
    if terms is None:
        return 2 * rows * m * k
    if site.kind == "conv":
        return 2 * rows * m * k + 2 * terms * m * k
    return 2 * rows * terms * (m * k // n + n * m)
