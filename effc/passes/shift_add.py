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
packed codes per call (weight memory really shrinks; the default on CUDA, where Triton
kernels read the codes), or the library op on the weight decoded once (`cache_decoded`; the
default on CPU, where decoding per call is far slower than the dense op; no memory saved).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

import effc.kernels.shift  # noqa: F401  (registers torch.ops.effc.shift_linear / shift_conv)
from effc.compiler.config import knob
from effc.compiler.graph_facts import copy_node_meta
from effc.compiler.report import SiteRow
from effc.passes.base import PassResult
from effc.passes.binary_attention import binary_attention_sites
from effc.passes.budget import Candidate, SiteOptions
from effc.passes.fitting_pass import Fitted, FittingConfig, FittingPass
from effc.compiler.metrics import matrix_rel_error
from effc.passes.shift_add_math import ShiftFit, exact_codes, fit, pack
from effc.passes.weight_sites import Site, replace_site, site_bias

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclasses.dataclass(frozen=True)
class ShiftAddConfig(FittingConfig):
    """shift_add's knobs: `options={"shift_add": effc.ShiftAddConfig(terms=2)}`."""

    option_key: ClassVar[str] = "shift_add"
    RULES: ClassVar[tuple[str, ...]] = ("terms", "max_error", "bytes_budget", "min_sqnr_db")

    terms: int | None = knob(None, "fixed power-of-two terms per weight (4 bits each) at every "
                             "site; None: the rule chooses per site", min=1, max=3)
    max_terms: int = knob(3, "the most terms a rule may choose", min=1, max=3)
    bytes_budget: float | None = knob(None, "fraction of the eligible weights' bytes to keep, "
                                      "allocated across sites by end-to-end sensitivity",
                                      min=0.0, max=1.0, min_exclusive=True)
    group: int | None = knob(None, "one scale per this many input columns of a row (None: "
                             "one per output channel)", min=1)
    output_aware: bool = knob(True, "with calibration, round to minimize the layer's output "
                              "error (GPTQ-style), not the weight's")
    cache_decoded: Literal["auto"] | bool = knob(
        "auto", "decode the codes once at compile time and run the library op (fast, but "
                "weight memory is not saved); False: decode per call from the packed codes "
                "(memory really shrinks); auto: cached on CPU, where decoding per call costs "
                "25-50x a dense matrix-vector product, per call on CUDA (Triton kernels)")
    attention: Literal["off", "binary"] = knob(
        "off", "binary: replace scaled_dot_product_attention by Hamming-similarity attention "
               "on b-bit codes of queries and keys (training-free, lossy: the report gives "
               "its end-to-end error)")
    attention_bits: int = knob(64, "bits of the query/key codes of binary attention", min=8)

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.terms is not None and self.terms > self.max_terms:
            raise ValueError(f"effc option {key + '.terms'!r}: {self.terms} is above "
                             f"max_terms={self.max_terms}")


@dataclasses.dataclass
class _Fits:
    """A site's fits by number of terms, and the relative error of each."""

    fits: dict[int, ShiftFit]
    errors: dict[int, float]


class ShiftAddPass(FittingPass):
    """Power-of-two weights; see the module docstring."""

    name = "shift_add"
    config_cls = ShiftAddConfig
    ALLOCATED_RULES = ("bytes_budget", "min_sqnr_db")
    BUDGET, COST = "bytes_budget", "bytes"

    def run(self, gm, ctx) -> PassResult:
        result = super().run(gm, ctx)
        if self.config.attention == "binary":
            result.sites.extend(binary_attention_sites(gm, ctx, self.name,
                                                       self.config.attention_bits))
        return result

    def structured(self, gm, ctx, site: Site) -> SiteRow | None:
        """A weight that already is a scaled sum of powers of two converts exactly; a
        computed weight that is not is skipped."""
        exact = exact_codes(site.matrix, self.config.max_terms)
        if exact is None and not site.computed:
            return None
        computed = (f"weight computed in the graph from {', '.join(site.computed)}"
                    if site.computed else "weight")
        if exact is None:
            return self.skip(site, f"{computed}, not a scaled sum of at most "
                                   f"{self.config.max_terms} powers of two per element")
        return self.exact(gm, ctx, site, f"{computed}: already a scaled sum of {exact.terms} "
                                         f"powers of two per element (exact)",
                          _Fits({exact.terms: exact}, {exact.terms: 0.0}), exact.terms)

    def fit_site(self, site: Site, ctx, rule: str, e2e) -> Fitted:
        cfg: ShiftAddConfig = self.config
        moment, why = self.moment(site, ctx)
        use = self.whitening(site, ctx) if cfg.output_aware and moment is not None else None
        note = ("output-aware rounding (calibration)" if use is not None else
                f"weight-error rounding ({why or 'output_aware=False'})")
        if site.bn is not None:
            note += "; BatchNorm folded"
        wanted = [cfg.terms] if rule == "terms" else range(1, cfg.max_terms + 1)

        def fits(c: torch.Tensor | None) -> _Fits:
            done = {t: fit(site.matrix, t, cfg.group, c) for t in wanted}
            return _Fits(done, {t: matrix_rel_error(site.matrix, f.matrix(), moment)
                                for t, f in done.items()})

        held = None
        if use is not None and rule in self.ALLOCATED_RULES and e2e is not None and \
                e2e.source == "samples":
            rest = self.whitening(site, ctx, held_out=True)
            held = fits(rest) if rest is not None else None
        return Fitted(site, moment, note, fits(use), held_out=held)

    def local_choice(self, w: Fitted, rule: str, bound: float, label: str
                     ) -> tuple[int | None, str]:
        errors = w.fit.errors
        if rule == "terms":
            return self.config.terms, f"terms={self.config.terms} asked for"
        ok = [t for t, e in sorted(errors.items()) if e <= bound]
        most = max(errors)
        return ((ok[0], f"fewest terms within {label} ({errors[ok[0]]:.3g})") if ok else
                (None, f"multiplication kept: over {label} with {most} terms "
                       f"({errors[most]:.3g} relative error)"))

    def candidates(self, w: Fitted) -> list[Candidate]:
        size, count = w.site.weight.element_size(), w.site.m * w.site.n
        return [Candidate(t, count, w.choosing.errors[t], bytes=f.bytes(size))
                for t, f in sorted(w.choosing.fits.items())]

    def approx(self, fits: _Fits, choice: int) -> torch.Tensor:
        return fits.fits[choice].matrix()

    # --- rewriting -------------------------------------------------------------------------
    def skip(self, site: Site, why: str, options: SiteOptions | None = None) -> SiteRow:
        row = super().skip(site, why, options)
        row.details["primitive"] = "multiply"
        return row

    def rewrite(self, gm, ctx, w: Fitted, terms: int, why: str) -> SiteRow:
        site, f, note, moment, options = w.site, w.fit.fits[terms], w.note, w.moment, w.options
        errors = w.fit.errors if len(w.fit.errors) > 1 else None
        dtype, device = site.weight.dtype, site.weight.device
        hint = site.weight_name.removesuffix(".weight")
        x, _ = site.operands()
        bias = site_bias(gm, ctx, site, f"{hint}.shift_bias")
        approx = f.matrix()
        if self._cached(ctx):
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
        error = {"weight_rel_fro": matrix_rel_error(site.matrix, approx, None)}
        if moment is not None:
            error["out_rel_fro"] = matrix_rel_error(site.matrix, approx, moment)
        elem = site.weight.element_size()
        details: dict[str, Any] = {
            "kind": site.kind, "primitive": f"shift ({f.terms} terms)", "terms": f.terms,
            "why": why, "shape": [site.m, site.n], "group": f.group,
            "bits_per_weight": 4 * f.terms, "bytes_before": size * elem,
            "bytes_after": f.bytes(elem), "weight": decoded,
            # what the compiled graph holds: the packed codes, or the decoded weight
            "runtime_bytes": size * elem if self._cached(ctx) else f.bytes(elem)}
        if errors:
            details["error_at_terms"] = {str(t): round(e, 6) for t, e in errors.items()}
        details.update(self.provenance(site, options))
        return SiteRow(self.name, site.weight_name, "rewritten", f"{note}; {decoded}", size,
                       size, error=error, details=details)

    def finish(self, rows: list[SiteRow], ctx) -> None:
        done = [r for r in rows if r.decision == "rewritten"]
        if done:
            before = sum(r.details["bytes_before"] for r in done)
            after = sum(r.details["bytes_after"] for r in done)
            cached = self._cached(ctx)
            ctx.note(f"shift_add: weight bytes of the {len(done)} rewritten sites {before} -> "
                     f"{after} ({after / before:.1%})" + (
                         "; decoded once at compile time (cache_decoded), so runtime weight "
                         "memory is not saved: cache_decoded=False keeps only the packed codes"
                         if cached else "; decoded per call"))

    def _cached(self, ctx) -> bool:
        choice = self.config.cache_decoded
        return ctx.device.type != "cuda" if choice == "auto" else choice
