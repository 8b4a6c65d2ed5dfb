"""low_rank: factorize Linear/Conv weights W ~= u @ v (activation-aware when calibrated).

Sites come from the shared finder (weight_sites.py: linear, GPT-2's Conv1D, `x @ W.T`,
convs with groups == 1, BatchNorm folded on inference graphs). A rewritten linear calls
`effc.low_rank_linear(x, v, u, b)`, a conv `effc.low_rank_conv` (k x k conv to r channels,
then 1 x 1). Rank rules: a fixed `rank` or `rank_ratio`, per-site `energy` or `max_error`, a
global `param_budget`, or an end-to-end bound `min_sqnr_db`; the last two choose ranks with
the shared allocator (budget.py), end to end when the calibration holds sample inputs. With
no rule the default is quality-bounded: `min_sqnr_db=25` with samples, else a per-site
`max_error` of 0.05. Papers: Maestro (ordered factors), SVD-LLM whitening.
`rank` and `rank_ratio` fix the rank before the spectrum is known, so large weights get only
their top factors from a randomized SVD (knob `svd`); the other rules read the full spectrum.
Whitening moments from few rows per feature are shrunk toward the identity (`shrinkage`), and
a classifier or LM head is fitted for the KL of its softmax (`output_fit`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

import effc.kernels.low_rank  # noqa: F401  (registers torch.ops.effc.low_rank_linear)
import effc.kernels.low_rank_conv  # noqa: F401  (registers torch.ops.effc.low_rank_conv)
from effc.compiler.calibration.statistics import shrinkage_for
from effc.compiler.config import PassConfig, knob
from effc.compiler.graph_facts import copy_node_meta
from effc.compiler.report import SiteRow
from effc.passes.base import Pass, PassResult
from effc.passes.budget import (DEFAULT_MIN_SQNR_DB, Candidate, EndToEnd, SiteOptions,
                                allocation_summary, candidate_details, choose, db, end_to_end,
                                output_sites)
from effc.passes.compensation import compensated_target, sequential_fit
from effc.passes.low_rank_math import (Factorization, OutputMetric, factorize,
                                       max_profitable_rank, output_error, output_error_curve,
                                       round_rank, shrink, softmax_fisher, weight_error)
from effc.passes.weight_sites import (STRUCTURE_TOL, Site, find_sites, replace_site, site_bias,
                                      site_rows, skip_reason, still_built)

RULES = ("rank", "rank_ratio", "energy", "max_error", "param_budget", "min_sqnr_db")
FIXED_RULES = ("rank", "rank_ratio")   # rank known from the shape alone, before any SVD
ALLOCATED_RULES = ("param_budget", "min_sqnr_db")  # chosen by the shared allocator
DEFAULT_MAX_ERROR = 0.05     # default without: each site's own relative error
MIN_GAIN = 0.01             # compensation is kept if it lowers the squared output error by 1 %
# output_fit="kl": the sample outputs' Fisher is shrunk this far toward I (it has rank <= the
# sample rows); on the pretrained MobileNetV2's classifier, 0.3 to 0.6 gave the best top-1
# agreement on held-out photos at ranks 256 and 384, with 32 or 96 rows alike
FISHER_SHRINKAGE = 0.3
MAX_FISHER_OUTPUTS = 8192   # an eigendecomposition of [m, m]: larger heads keep output_fit mse


@dataclasses.dataclass(frozen=True)
class LowRankConfig(PassConfig):
    """low_rank's knobs: `options={"low_rank": effc.LowRankConfig(param_budget=0.7)}`."""

    option_key: ClassVar[str] = "low_rank"

    rank: int | None = knob(None, "fixed rank for every site", min=1)
    rank_ratio: float | None = knob(None, "rank as a fraction of min(m, n)", min=0.0, max=1.0,
                                    min_exclusive=True)
    energy: float | None = knob(None, "smallest rank keeping this fraction of the squared "
                                "spectrum", min=0.0, max=1.0, min_exclusive=True)
    max_error: float | None = knob(None, "smallest rank whose relative output error (weight "
                                   "error without calibration) is at most this", min=0.0,
                                   max=1.0, min_exclusive=True)
    param_budget: float | None = knob(None, "fraction of the eligible weights' parameters to "
                                      "keep, allocated across sites by end-to-end sensitivity",
                                      min=0.0, max=1.0, min_exclusive=True)
    min_sqnr_db: float | None = knob(None, "compress as far as the graph's outputs keep this "
                                     "SQNR (dB) on the calibration's sample inputs (default 25 "
                                     "when no rule is given and samples exist)", min=0.0)
    shrinkage: Literal["auto"] | float = knob(
        "auto", "fraction of the whitening moment replaced by the identity of the same trace, "
                "so input directions the calibration rarely saw still count; auto: input "
                "features / calibration rows, at most 0.3 (a moment from few rows per feature "
                "is trusted less)", min=0.0, max=1.0)
    output_fit: Literal["kl", "mse"] = knob(
        "kl", "how a site feeding the main output (a classifier, an LM head) is fitted when "
              "the calibration holds sample inputs: kl: its output error weighed by the "
              "softmax's Fisher information on the samples' outputs (second-order KL, which "
              "keeps the top classes); mse: plain output error (for heads that are not logits)")
    rank_multiple: int = knob(8, "round ranks up to a multiple of this", min=1)
    min_saving: float = knob(0.1, "rewrite only if r(m+n) <= (1 - min_saving) m n", min=0.0, max=0.99)
    whiten: bool = knob(True, "use calibration statistics (activation-aware SVD) when present")
    conv: bool = knob(True, "also factorize conv1d/conv2d weights")
    fold_bn: bool = knob(True, "fold an eval-mode BatchNorm into the conv/linear before it")
    sensitivity: Literal["end_to_end", "layer"] = knob(
        "end_to_end", "how param_budget / min_sqnr_db weigh a site's error: end_to_end: its "
        "measured effect on the graph's outputs (calibration needed); layer: its own error")
    max_forwards: int = knob(512, "bound on the graph runs that measure sensitivities: each "
                             "site costs one per sample call; past the bound fewer sample "
                             "calls are used; param_budget's refining rounds use what is "
                             "left", min=1)
    compensate: bool = knob(True, "with calibration sample inputs, fit each site on the inputs "
                            "the already-rewritten sites before it produce (kept only where "
                            "it lowers the measured output error)")
    output_layers: Literal["auto"] | bool = knob(
        "auto", "the sites that feed the main output directly (a classifier, an LM head): "
                "auto: the default rule takes them only when measured end to end, every "
                "explicit rule takes them; True: always; False: never")
    error_ranks: int = knob(4, "how many other ranks to report the error of", min=0, max=16)
    svd: Literal["auto", "full", "randomized"] = knob(
        "auto", "auto: randomized SVD of only the top factors when the rank is fixed (rank, "
                "rank_ratio), min(m, n) >= 1024 and r <= min(m, n) / 4; else full SVD")

    def validate(self, key: str) -> None:
        given = [r for r in RULES if getattr(self, r) is not None]
        if len(given) > 1:
            raise ValueError(f"effc option {key!r}: give one rank rule, got {', '.join(given)}; "
                             f"accepted rules: {', '.join(RULES)}")
        if self.svd == "randomized" and self.rule not in FIXED_RULES:
            raise ValueError(f"effc option {key + '.svd'!r}: 'randomized' computes only the top "
                             f"factors, so it needs a fixed rank rule ({', '.join(FIXED_RULES)});"
                             f" {self.rule} reads the whole spectrum: use 'auto' or 'full'")

    @property
    def rule(self) -> str:
        """The rank rule given, or "default" (quality-bounded) when none is."""
        return next((r for r in RULES if getattr(self, r) is not None), "default")


@dataclasses.dataclass
class _Work:
    """One eligible site on its way through the pass."""

    site: Site
    fac: Factorization | None
    moment: torch.Tensor | None
    note: str
    options: SiteOptions | None = None
    # the factorization ranks are chosen with: fitted without the calibration's sample calls,
    # so that measuring on the samples does not measure on the fitting data
    held_out: Factorization | None = None
    metric: OutputMetric | None = None  # of a head fitted with output_fit="kl"

    @property
    def choosing(self) -> Factorization:
        return self.held_out if self.held_out is not None else self.fac


class LowRankPass(Pass):
    """Factorize weight sites; see the module docstring."""

    name = "low_rank"
    config_cls = LowRankConfig
    rewrites_weights = True

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        cfg: LowRankConfig = self.config
        rows: list[SiteRow] = []
        work: list[_Work] = []
        misses: list[str] = []  # calibration given but unusable at these sites
        e2e = self._end_to_end(gm, ctx)
        rule = self._rule(e2e)
        sites = list(find_sites(gm, ctx.facts, fold_bn=cfg.fold_bn, computed=True))
        heads = output_sites(gm, {s.node for s in sites if isinstance(s, Site)})
        for site in sites:
            if isinstance(site, str):
                name, _, why = site.partition(": ")
                rows.append(SiteRow(self.name, name, "skipped", why))
                continue
            if site.computed:
                rows.append(self._structured(gm, ctx, site))
                continue
            why = self._ineligible(site, ctx, site.node in heads, e2e)
            if why:
                rows.append(self._skip(site, why))
                continue
            moment, use, note = self._moment(site, ctx)
            if ctx.calibration is not None and moment is None:
                misses.append(note.removeprefix("plain SVD: "))
            metric = None
            if site.node in heads and cfg.output_fit == "kl":
                metric, why = self._output_metric(site, e2e)
                if metric is not None or use:
                    note += f"; {why}"
            if site.bn is not None:
                note += "; BatchNorm folded"
            fixed_rank = self._fixed_rank(site)[0] if rule in FIXED_RULES else None
            if rule in FIXED_RULES and fixed_rank is None:
                work.append(_Work(site, None, moment, note))  # not profitable: no SVD needed
                continue
            try:
                fac = factorize(site.matrix, self._shrunk(moment, ctx.calibration.inputs[
                    site.weight_name].rows) if use else None,
                                rank=fixed_rank, method=cfg.svd, out_metric=metric)
            except (RuntimeError, ValueError) as exc:  # e.g. an SVD that does not converge
                if ctx.config.strict:
                    raise
                rows.append(self._skip(site, f"factorization failed: {exc}"))
                continue
            w = _Work(site, fac, moment, note, metric=metric)
            if e2e is not None and use and e2e.source == "samples":
                w.held_out = self._held_out(site, ctx, metric)
            work.append(w)
        ranks = self._choose_ranks(work, rule, e2e, ctx)
        if cfg.compensate and e2e is not None and e2e.source == "samples":
            self._compensate(gm, e2e, work, ranks, ctx)
        for w in work:
            rank, why = ranks[w.site.weight_name]
            if rank is None:
                rows.append(self._skip(w.site, why, w.options))
                continue
            if not w.fac.complete:
                w.note += f"; randomized SVD (top {w.fac.known_rank} factors only)"
            denied = ctx.claim(w.site.weight_name, w.site.sources)
            if denied:
                rows.append(self._skip(w.site, denied, w.options))
                continue
            rows.append(self._rewrite(gm, ctx, w, rank))
        if misses:
            served = len(work) - len(misses)
            ctx.warn(f"the calibration serves {served} of {len(work)} sites (the rest "
                     f"fall back to a plain SVD), e.g. {misses[0]}")
        return PassResult(rows)

    def _structured(self, gm: fx.GraphModule, ctx, site: Site) -> SiteRow:
        """A weight computed in the graph (a trained low-rank product u @ v): rewritten exactly
        at its numerical rank when that saves parameters, else left to the next pass."""
        cfg: LowRankConfig = self.config
        why = skip_reason(site, ctx, cfg.conv)
        if why:
            return self._skip(site, why)
        computed = f"weight computed in the graph from {', '.join(site.computed)}"
        try:
            fac = factorize(site.matrix)
        except (RuntimeError, ValueError) as exc:
            return self._skip(site, f"{computed}; factorization failed: {exc}")
        exact = (fac.tail_rel_error() <= STRUCTURE_TOL).nonzero()
        rank = int(exact[0].item()) if len(exact) else min(site.m, site.n)
        limit = max_profitable_rank(site.m, site.n, cfg.min_saving)
        if rank < 1 or rank > limit:
            return self._skip(site, f"{computed}, not of low rank (numerical rank {rank}, "
                                    f"above {limit} where r(m+n) <= {1 - cfg.min_saving:g} mn)")
        denied = ctx.claim(site.weight_name, site.sources)
        if denied:
            return self._skip(site, denied)
        row = self._rewrite(gm, ctx, _Work(site, fac, None, f"{computed}: of rank {rank} "
                                                            f"(exact){still_built(site)}"), rank)
        row.details.update(rule="structure", computed_from=list(site.computed))
        return row

    # --- decisions -------------------------------------------------------------------------
    def _end_to_end(self, gm: fx.GraphModule, ctx) -> EndToEnd | None:
        cfg: LowRankConfig = self.config
        allocated = (cfg.rule in ALLOCATED_RULES + ("default",)
                     and cfg.sensitivity == "end_to_end")
        # output_fit="kl" reads the samples' outputs, as compensation does
        return end_to_end(gm, ctx, allocated=allocated,
                          compensate=cfg.compensate or cfg.output_fit == "kl")

    def _output_metric(self, site: Site, e2e: EndToEnd | None) -> tuple[OutputMetric | None, str]:
        """The Fisher metric a head is fitted with (output_fit="kl"), or None, and why."""
        if e2e is None or e2e.source != "samples" or not e2e.reference[0]:
            return None, ("output layer fitted for its mean squared error (output_fit='kl' "
                          "needs the calibration's sample outputs)")
        outs = [ref[e2e.main] for ref in e2e.reference]
        if outs[0].shape[-1] != site.m or site.m > MAX_FISHER_OUTPUTS:
            return None, (f"output layer fitted for its mean squared error (the main output "
                          f"has {outs[0].shape[-1]} features, the layer {site.m}; output_fit="
                          f"'kl' needs them equal and at most {MAX_FISHER_OUTPUTS})")
        rows = torch.cat([o.reshape(-1, site.m) for o in outs])
        metric = OutputMetric.of(softmax_fisher(rows, FISHER_SHRINKAGE))
        return metric, (f"output layer fitted for the KL of its softmax (Fisher information of "
                        f"{rows.shape[0]} sample output rows, shrunk {FISHER_SHRINKAGE:g} toward I)")

    def _shrunk(self, moment: torch.Tensor, rows: int) -> torch.Tensor:
        """The whitening moment shrunk as the `shrinkage` knob says."""
        return shrink(moment, shrinkage_for(self.config.shrinkage, moment.shape[0], rows))

    def _held_out(self, site: Site, ctx, metric: OutputMetric | None = None
                  ) -> Factorization | None:
        """The whitened factorization from the moments of the non-sample calibration calls."""
        moment = ctx.calibration.whitening_moment(site.weight_name, self.config.shrinkage,
                                                  held_out=True)
        if moment is None or moment.shape != (site.n, site.n):
            return None
        try:
            return factorize(site.matrix, moment, out_metric=metric)
        except (RuntimeError, ValueError):
            return None

    def _rule(self, e2e: EndToEnd | None) -> str:
        rule = self.config.rule
        if rule == "default":
            return "min_sqnr_db" if e2e is not None else "max_error"
        if rule == "min_sqnr_db" and e2e is None:
            return "max_error"
        return rule

    def _ineligible(self, site: Site, ctx, head: bool, e2e) -> str:
        cfg: LowRankConfig = self.config
        why = skip_reason(site, ctx, cfg.conv)
        if why:
            return why
        if max_profitable_rank(site.m, site.n, cfg.min_saving) < 1:
            return f"too small to save parameters ({site.m}x{site.n})"
        if head and (cfg.output_layers is False or (
                cfg.output_layers == "auto" and cfg.rule == "default" and e2e is None)):
            return ("output layer (feeds the main output directly): the default keeps it "
                    "dense without end-to-end measurements (calibrate with sample inputs, ask "
                    "for a rank rule, or set output_layers=True)")
        return ""

    def _moment(self, site: Site, ctx) -> tuple[torch.Tensor | None, bool, str]:
        """(E[x x^T] or None, whether to factorize with it, note). Measured even if not used."""
        if ctx.calibration is None:
            return None, False, "plain SVD (no calibration given)"
        moment, why = ctx.calibration.lookup(site.weight_name, tuple(site.weight.shape))
        if moment is not None and moment.shape != (site.n, site.n):
            moment, why = None, (f"calibration moment is {tuple(moment.shape)}, the site's "
                                 f"input has {site.n} features")
        if moment is None:
            return None, False, f"plain SVD: {why}"
        if not self.config.whiten:
            return moment, False, "plain SVD (whiten=False)"
        return moment, True, "whitened SVD (calibration)"

    def _fixed_rank(self, site: Site) -> tuple[int | None, str]:
        """The rank of rule `rank`/`rank_ratio`, from the shape alone, or (None, why not)."""
        cfg: LowRankConfig = self.config
        full = min(site.m, site.n)
        r = min(cfg.rank, full) if cfg.rule == "rank" else math.ceil(cfg.rank_ratio * full)
        return self._profitable(site, r)

    def _profitable(self, site: Site, r: int, rule: str | None = None) -> tuple[int | None, str]:
        cfg: LowRankConfig = self.config
        r = round_rank(max(r, 1), cfg.rank_multiple, min(site.m, site.n))
        limit = max_profitable_rank(site.m, site.n, cfg.min_saving)
        if r > limit:
            return None, (f"not profitable: {rule or cfg.rule} asks rank {r}, above {limit} "
                          f"where r(m+n) <= {1 - cfg.min_saving:g} mn")
        return r, ""

    def _choose_ranks(self, work: list[_Work], rule: str, e2e, ctx
                      ) -> dict[str, tuple[int | None, str]]:
        cfg: LowRankConfig = self.config
        if rule in ALLOCATED_RULES:
            return self._allocate(work, rule, e2e, ctx)
        if rule in FIXED_RULES:
            return {w.site.weight_name: self._fixed_rank(w.site) for w in work}
        out: dict[str, tuple[int | None, str]] = {}
        bound = cfg.max_error if cfg.max_error is not None else DEFAULT_MAX_ERROR
        for w in work:
            err = _full_curve(w.fac)
            if rule == "energy":
                r = int(((1 - err.pow(2)) >= cfg.energy - 1e-12).nonzero()[0].item())
            else:
                r = int((err <= bound).nonzero()[0].item())
            label = rule if cfg.rule != "default" else f"the default bound max_error={bound:g}"
            out[w.site.weight_name] = self._profitable(w.site, r, label)
        if cfg.rule in ("default", "min_sqnr_db"):
            why = ("no calibration" if ctx.calibration is None
                   else "the calibration holds no sample inputs of this graph")
            ctx.note(f"low_rank: {why}, so ranks meet a per-site error bound of {bound:g} "
                     f"(data-free proxy: each site's own relative "
                     f"{'output' if ctx.calibration is not None else 'weight'} error) instead "
                     f"of an end-to-end bound; effc.calibrate(model, batches) enables the "
                     f"end-to-end default, param_budget asks for a size")
        return out

    def _candidates(self, w: _Work) -> SiteOptions:
        """Ranks in steps of rank_multiple up to the largest profitable one, and dense."""
        site, cfg = w.site, self.config
        mult, err = cfg.rank_multiple, _full_curve(w.choosing)
        limit = max_profitable_rank(site.m, site.n, cfg.min_saving) // mult * mult
        size = site.weight.element_size()
        dense = Candidate(None, site.m * site.n, 0.0, bytes=site.m * site.n * size,
                          flops=_flops(site, None))
        cands = [Candidate(r, r * (site.m + site.n), err[r].item(),
                           bytes=r * (site.m + site.n) * size, flops=_flops(site, r))
                 for r in range(mult, limit + 1, mult) if r <= w.choosing.known_rank]
        return SiteOptions(site.weight_name, cands + [dense])

    def _allocate(self, work: list[_Work], rule: str, e2e, ctx
                  ) -> dict[str, tuple[int | None, str]]:
        cfg: LowRankConfig = self.config
        out: dict[str, tuple[int | None, str]] = {}
        options = []
        for w in work:
            w.options = self._candidates(w)
            if len(w.options.candidates) == 1:
                out[w.site.weight_name] = (None, f"not profitable at rank_multiple "
                                                 f"{cfg.rank_multiple}")
            else:
                options.append(w.options)
        if not options:
            return out
        by_key = {w.site.weight_name: w for w in work}

        def realize(choice: dict[str, Candidate]) -> dict[str, torch.Tensor]:
            return {k: _approx_weight(by_key[k], c.choice, by_key[k].choosing)
                    for k, c in choice.items() if c.choice is not None}

        bound = None
        if rule == "param_budget":
            budget = cfg.param_budget * sum(w.site.m * w.site.n for w in work)
            budget -= sum(w.site.m * w.site.n for w in work if w.site.weight_name in out)
            alloc = choose(options, e2e, ctx, pass_name=self.name, realize=realize,
                           max_params=budget, max_forwards=cfg.max_forwards,
                           end_to_end_sensitivity=cfg.sensitivity == "end_to_end")
        else:
            bound = cfg.min_sqnr_db if cfg.min_sqnr_db is not None else DEFAULT_MIN_SQNR_DB
            alloc = choose(options, e2e, ctx, pass_name=self.name, realize=realize,
                           min_sqnr_db=bound, max_forwards=cfg.max_forwards,
                           end_to_end_sensitivity=cfg.sensitivity == "end_to_end")
        whitened = [w for w in work if w.options in options and w.moment is not None
                    and cfg.whiten]
        held_out = None if not whitened else all(w.held_out is not None for w in whitened)
        ctx.note(allocation_summary(self.name, rule, e2e, len(options), alloc,
                                    end_to_end_sensitivity=cfg.sensitivity == "end_to_end",
                                    held_out=held_out, bound=bound,
                                    default=cfg.rule == "default"))
        for s in options:
            c = alloc.choice[s.key]
            out[s.key] = ((c.choice, "") if c.choice is not None else
                          (None, f"kept dense by the {rule} allocator"))
        return out

    def _compensate(self, gm: fx.GraphModule, e2e: EndToEnd, work: list[_Work],
                    ranks: dict[str, tuple[int | None, str]], ctx) -> None:
        """Refit the chosen sites in graph order on the inputs the rewritten sites before them
        produce; keep the refits only if the measured output error drops."""
        chosen = {w.site.weight_name: w for w in work if ranks[w.site.weight_name][0] is not None}
        if not chosen:
            return
        independent = {k: (w.fac, w.note) for k, w in chosen.items()}
        before = e2e.error2({k: _approx_weight(w, ranks[k][0]) for k, w in chosen.items()})

        def refit(site: Site, c_hh, c_xh, rows: int) -> torch.Tensor:
            w, rank = chosen[site.weight_name], ranks[site.weight_name][0]
            if c_hh is not None:
                try:
                    target = compensated_target(site.matrix, c_hh, c_xh)
                    w.fac = factorize(target, self._shrunk(c_hh / rows, rows), method="full",
                                      out_metric=w.metric)
                    w.note += f"; error-compensated fit ({rows} rows)"
                except (RuntimeError, ValueError) as exc:
                    w.note += f"; independent fit (compensation failed: {exc})"
            else:
                w.note += f"; independent fit ({rows} calibration rows: too few to compensate)"
            u, v = w.fac.factors(rank)
            return u @ v

        sequential_fit(gm, e2e, [w.site for w in chosen.values()], refit)
        after = e2e.error2({k: _approx_weight(w, ranks[k][0]) for k, w in chosen.items()})
        if after < (1 - MIN_GAIN) * before:
            ctx.note(f"low_rank: error compensation on the calibration samples: output SQNR "
                     f"{db(before):.1f} -> {db(after):.1f} dB")
            return
        for k, (fac, note) in independent.items():
            chosen[k].fac, chosen[k].note = fac, note
        ctx.note(f"low_rank: error compensation did not lower the output error on the "
                 f"calibration samples by {MIN_GAIN:.0%} ({db(before):.2f} -> {db(after):.2f} "
                 f"dB): independent fits kept")

    # --- rewriting -------------------------------------------------------------------------
    def _skip(self, site: Site, why: str, options: SiteOptions | None = None) -> SiteRow:
        size = site.m * site.n
        flops = _flops(site, None)
        details = {} if options is None else candidate_details(options)
        return SiteRow(self.name, site.weight_name, "skipped", why, size, size, flops, flops,
                       details=details)

    def _rewrite(self, gm, ctx, w: _Work, rank: int) -> SiteRow:
        site, fac, moment = w.site, w.fac, w.moment
        u64, v64 = fac.factors(rank)
        dtype, device = site.weight.dtype, site.weight.device
        u, v = u64.to(device=device, dtype=dtype), v64.to(device=device, dtype=dtype)
        if site.kind == "conv":
            spatial = site.weight.dim() - 2
            u = u.reshape(site.m, rank, *([1] * spatial))
            v = v.reshape(rank, *site.weight.shape[1:])
        hint = site.weight_name.removesuffix(".weight")
        v_node = ctx.add_constant(gm, v.contiguous(), derived_from=site.sources,
                                  name_hint=f"{hint}.lr_v")
        u_node = ctx.add_constant(gm, u.contiguous(), derived_from=site.sources,
                                  name_hint=f"{hint}.lr_u")
        x, _ = site.operands()
        bias = site_bias(gm, ctx, site, f"{hint}.lr_bias")
        with gm.graph.inserting_before(site.node):
            if site.kind == "conv":
                new = gm.graph.call_function(torch.ops.effc.low_rank_conv.default,
                                             (x, v_node, u_node, bias, *site.conv_args))
            else:
                new = gm.graph.call_function(torch.ops.effc.low_rank_linear.default,
                                             (x, v_node, u_node, bias))
        copy_node_meta(new, site.output)
        replace_site(gm, site, new)
        error = weight_error(site.matrix, u64, v64)
        if moment is not None:
            error.update(output_error(site.matrix, u64, v64, moment))
        details = self._details(site, fac, rank, moment)
        if w.options is not None:
            details.update(candidate_details(w.options))
        return SiteRow(self.name, site.weight_name, "rewritten", w.note,
                       site.m * site.n, rank * (site.m + site.n),
                       _flops(site, None), _flops(site, rank), error, details)

    def _details(self, site: Site, fac: Factorization, rank: int,
                 moment: torch.Tensor | None) -> dict[str, Any]:
        full = min(site.m, site.n)
        others = sorted({round_rank(max(1, int(rank * f)), self.config.rank_multiple, full)
                         for f in (0.25, 0.5, 2.0, 4.0)} - {rank})[: self.config.error_ranks]
        ranks = [r for r in others + [rank] if r <= fac.known_rank]
        if fac.whitened and moment is not None:
            # measured against the calibration's own moment: the fit may have used a shrunk
            # one, or weighed the outputs (output_fit), so its spectrum is not this error
            err = output_error_curve(site.matrix, fac.u, fac.v, moment)
            metric, curve = "out_rel_fro", {r: err[r].item() for r in ranks}
        else:
            err = fac.tail_rel_error()
            metric, curve = ("out_rel_fro" if fac.whitened else "weight_rel_fro",
                             {r: err[r].item() for r in ranks})
        out = {"kind": site.kind, "rank": rank, "full_rank": full, "shape": [site.m, site.n],
               "rule": self.config.rule, "svd": fac.method,
               f"{metric}_at_rank": {str(r): round(e, 6) for r, e in curve.items()}}
        if site.bn is not None:
            out["batch_norm_folded"] = site.bn.node.name
        if not fac.complete:  # say where the curve stops instead of extrapolating it
            out["error_known_up_to_rank"] = fac.known_rank
        return out


def _flops(site: Site, rank: int | None) -> int:
    rows, m, n = site_rows(site), site.m, site.n
    if rank is None:
        return 2 * rows * m * n
    return 2 * rows * rank * (m + n)  # conv: the k x k conv to r channels, then 1 x 1


def _approx_weight(w: _Work, rank: int, fac: Factorization | None = None) -> torch.Tensor:
    """The stored weight whose call computes the rank-`rank` approximation (BatchNorm unfolded)."""
    u, v = (fac or w.fac).factors(rank)
    return w.site.weight_from_matrix(u @ v)


def _full_curve(fac: Factorization) -> torch.Tensor:
    """The error at every rank, which only a full spectrum gives (validate() keeps it so)."""
    if not fac.complete:
        raise ValueError(f"this rank rule needs the full spectrum, but the {fac.method} SVD "
                         f"computed only the top {fac.known_rank} factors")
    return fac.tail_rel_error()
