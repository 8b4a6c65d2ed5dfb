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
from effc.compiler.config import knob
from effc.compiler.graph_facts import copy_node_meta
from effc.compiler.report import SiteRow
from effc.passes.budget import Candidate, SiteOptions
from effc.passes.fitting_pass import Fitted, FittingConfig, FittingPass
from effc.passes.hypercomplex_math import (N_CHOICES, KroneckerFit, kronecker_fit,
                                           kronecker_structure, max_terms, params)
from effc.compiler.metrics import matrix_rel_error
from effc.passes.low_rank_math import output_error, weight_error
from effc.passes.weight_sites import Site, replace_site, site_bias, site_rows



@dataclasses.dataclass(frozen=True)
class HypercomplexConfig(FittingConfig):
    """hypercomplex's knobs: `options={"hypercomplex": effc.HypercomplexConfig(n=4)}`."""

    option_key: ClassVar[str] = "hypercomplex"
    RULES: ClassVar[tuple[str, ...]] = ("terms", "max_error", "param_budget", "min_sqnr_db")

    n: Literal[2, 3, 4, 8, 16] = knob(4, "the hypercomplex dimension of fitted dense weights "
                                      "(A_t: n x n, S_t: out/n x in/n); trained PHM layers are "
                                      "recognized at whichever n they have")
    terms: int | None = knob(None, "fixed number of Kronecker terms per fitted site (a PHM "
                             "layer has n); None: the rule chooses per site", min=1)
    param_budget: float | None = knob(None, "fraction of the eligible weights' parameters to "
                                      "keep, allocated across sites by end-to-end sensitivity",
                                      min=0.0, max=1.0, min_exclusive=True)
    min_saving: float = knob(0.1, "rewrite a fitted site only if it keeps at most "
                             "(1 - min_saving) of its parameters", min=0.0, max=0.99)
    whiten: bool = knob(True, "fit to the layer's outputs on the calibration inputs (input "
                        "covariance approximated by its nearest Kronecker product)")


class HypercomplexPass(FittingPass):
    """Kronecker-sum rewrites; see the module docstring."""

    name = "hypercomplex"
    config_cls = HypercomplexConfig
    ALLOCATED_RULES = ("param_budget", "min_sqnr_db")

    def ineligible(self, site: Site, ctx) -> str:
        cfg: HypercomplexConfig = self.config
        n, cin = cfg.n, site.weight.shape[1] if site.kind == "conv" else site.n
        if site.m % n or cin % n:
            what = "channels" if site.kind == "conv" else "shape"
            return f"n={n} does not divide the weight's {what} ({site.m} out, {cin} in)"
        if max_terms(site.m, site.n, n, cfg.min_saving) < 1:
            return f"too small to save parameters at n={n} ({site.m}x{site.n})"
        return ""

    def fit_site(self, site: Site, ctx, rule: str, e2e) -> Fitted | str:
        cfg: HypercomplexConfig = self.config
        moment, why = self.moment(site, ctx)
        note = ("Kronecker fit whitened by the calibration" if moment is not None and cfg.whiten
                else f"plain Kronecker fit ({why or 'whiten=False'})")
        if site.bn is not None:
            note += "; BatchNorm folded"
        try:
            fit = kronecker_fit(site.matrix, cfg.n, self.whitening(site, ctx)
                                if cfg.whiten and moment is not None else None)
        except (RuntimeError, ValueError) as exc:
            if ctx.config.strict:
                raise
            return f"Kronecker fit failed: {exc}"
        held = None  # for allocation: fitted without the sample calls it is measured on
        if moment is not None and cfg.whiten and rule in self.ALLOCATED_RULES and \
                e2e is not None and e2e.source == "samples":
            rest = self.whitening(site, ctx, held_out=True)
            if rest is not None:
                try:
                    held = kronecker_fit(site.matrix, cfg.n, rest)
                except (RuntimeError, ValueError):
                    held = None
        return Fitted(site, moment, note, fit, held_out=held)

    def local_choice(self, w: Fitted, rule: str, bound: float, label: str
                     ) -> tuple[int | None, str]:
        cfg: HypercomplexConfig = self.config
        limit = max_terms(w.site.m, w.site.n, cfg.n, cfg.min_saving)
        err = w.fit.tail_rel_error()
        if rule == "terms":
            t = cfg.terms
            return (t, "") if t <= limit else (
                None, f"not profitable: terms={t} is above {limit}, the most that keep "
                      f"{1 - cfg.min_saving:g} of the parameters at n={cfg.n}")
        ok = [t for t in range(1, limit + 1) if err[t] <= bound]
        t = ok[0] if ok else None
        if t is not None and w.moment is not None:  # the curve is exact only for Kronecker
            while t <= limit and self._out_error(w, t) > bound:  # input covariances
                t += 1
            t = t if t <= limit else None
        return (t, "") if t else (
            None, f"over {label}: {err[limit].item():.3g} relative error at the most "
                  f"profitable {limit} terms (n={cfg.n})")

    def _out_error(self, w: Fitted, terms: int) -> float:
        return matrix_rel_error(w.site.matrix, w.fit.matrix(terms), w.moment)

    def candidates(self, w: Fitted) -> list[Candidate]:
        """T = 1 .. the most profitable number of terms."""
        site, cfg = w.site, self.config
        err, size = w.choosing.tail_rel_error(), site.weight.element_size()
        out = []
        for t in range(1, max_terms(site.m, site.n, cfg.n, cfg.min_saving) + 1):
            cost = params(site.m, site.n, cfg.n, t)
            out.append(Candidate(t, cost, err[t].item(), bytes=cost * size,
                                 flops=_flops(site, t, cfg.n)))
        return out

    def approx(self, fit: KroneckerFit, choice: int) -> torch.Tensor:
        return fit.matrix(choice)

    def structured(self, gm: fx.GraphModule, ctx, site: Site) -> SiteRow | None:
        """A weight computed in the graph: rewritten exactly if it is a Kronecker sum."""
        if not site.computed:
            return None
        cin = site.weight.shape[1] if site.kind == "conv" else None
        found = kronecker_structure(site.matrix, in_features=cin)
        computed = f"weight computed in the graph from {', '.join(site.computed)}"
        if found is None:
            return self.skip(site, f"{computed}, not a sum of at most n Kronecker products "
                                   f"for any n in {N_CHOICES} dividing it")
        fit, terms = found
        return self.exact(gm, ctx, site, f"{computed}: a sum of {terms} Kronecker products at "
                                         f"n={fit.n} (exact)", fit, terms)

    # --- rewriting -------------------------------------------------------------------------
    def skip(self, site: Site, why: str, options: SiteOptions | None = None) -> SiteRow:
        row = super().skip(site, why, options)
        row.flops_before = row.flops_after = _flops(site, None)
        return row

    def rewrite(self, gm, ctx, w: Fitted, terms: int, why: str) -> SiteRow:
        site, fit, note, moment, options = w.site, w.fit, w.note, w.moment, w.options
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
        error = weight_error(site.matrix, approx)
        if moment is not None:
            error.update(output_error(site.matrix, approx, None, moment))
        err = fit.tail_rel_error()
        details: dict[str, Any] = {
            "kind": site.kind, "n": fit.n, "terms": terms, "shape": [site.m, site.n],
            "rule": "structure" if site.computed else self.config.rule, "why": why,
            ("out" if fit.whitened else "weight") + "_rel_fro_at_terms":
                {str(t): round(err[t].item(), 6) for t in range(1, min(len(err) - 1, 2 * terms) + 1)}}
        details.update(self.provenance(site, options))
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
