"""low_rank: factorize Linear/Conv weights W ~= u @ v (activation-aware when calibrated).

Sites: `linear(x, W, b)`; `addmm(b, x, W)` and `matmul(x, W)` with a 2-D parameter W stored
[in, out] (Hugging Face GPT-2's Conv1D); `x @ W.T` (Falcon's FalconLinear); `conv1d`/`conv2d` with a parameter weight and
groups == 1. A rewritten linear calls `effc.low_rank_linear(x, v, u, b)`, a conv
`effc.low_rank_conv` (k x k conv to r channels, then 1 x 1). Rank rules: a fixed `rank`,
`rank_ratio`, `energy`, per-site `max_error`, or a global `param_budget` allocated across
layers by sensitivity. Papers: Maestro (ordered factors), SVD-LLM whitening; see PAPERS.md.
`rank` and `rank_ratio` fix the rank before the spectrum is known, so large weights get only
their top factors from a randomized SVD (knob `svd`); the other rules read the full spectrum.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

import effc.kernels.low_rank  # noqa: F401  (registers torch.ops.effc.low_rank_linear)
import effc.kernels.low_rank_conv  # noqa: F401  (registers torch.ops.effc.low_rank_conv)
from effc.compiler.config import PassConfig, knob
from effc.compiler.graph_facts import copy_node_meta, is_transpose, node_shape
from effc.compiler.report import SiteRow
from effc.passes.base import Pass, PassResult
from effc.passes.low_rank_math import (BudgetSite, Factorization, allocate, factorize,
                                       max_profitable_rank, output_error, round_rank, weight_error)

RULES = ("rank", "rank_ratio", "energy", "max_error", "param_budget")
FIXED_RULES = ("rank", "rank_ratio")   # rank known from the shape alone, before any SVD
DEFAULT_RANK_RATIO = 0.25


@dataclasses.dataclass(frozen=True)
class LowRankConfig(PassConfig):
    """low_rank's knobs: `options={"low_rank": effc.LowRankConfig(param_budget=0.7)}`."""

    option_key: ClassVar[str] = "low_rank"

    rank: int | None = knob(None, "fixed rank for every site", min=1)
    rank_ratio: float | None = knob(None, "rank as a fraction of min(m, n) (default 0.25 when "
                                    "no rule is given)", min=0.0, max=1.0, min_exclusive=True)
    energy: float | None = knob(None, "smallest rank keeping this fraction of the squared "
                                "spectrum", min=0.0, max=1.0, min_exclusive=True)
    max_error: float | None = knob(None, "smallest rank whose relative output error (weight "
                                   "error without calibration) is at most this", min=0.0,
                                   max=1.0, min_exclusive=True)
    param_budget: float | None = knob(None, "fraction of the eligible weights' parameters to "
                                      "keep, allocated across layers by sensitivity", min=0.0,
                                      max=1.0, min_exclusive=True)
    rank_multiple: int = knob(8, "round ranks up to a multiple of this", min=1)
    min_saving: float = knob(0.1, "rewrite only if r(m+n) <= (1 - min_saving) m n", min=0.0, max=0.99)
    whiten: bool = knob(True, "use calibration statistics (activation-aware SVD) when present")
    conv: bool = knob(True, "also factorize conv1d/conv2d weights")
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
        return next((r for r in RULES if getattr(self, r) is not None), "rank_ratio")


@dataclasses.dataclass
class Site:
    """A factorizable call: the node, its weight as an [m, n] (out x in) matrix, and how to rebuild."""

    node: fx.Node
    kind: str                  # "linear" | "addmm" | "matmul" | "matmul_t" | "conv"
    weight_name: str
    weight: torch.Tensor       # the parameter as stored
    matrix: torch.Tensor       # [m, n] out x in view
    conv_args: tuple = ()      # stride, padding, dilation
    view: fx.Node | None = None  # matmul_t: the `W.T` node between the weight and the matmul

    def operands(self) -> tuple[fx.Node, Any]:
        """(x, bias) read from the node now: earlier rewrites may have replaced x's producer."""
        args, kw = self.node.args, self.node.kwargs
        if self.kind == "addmm":
            return args[1], args[0]
        if self.kind in ("matmul", "matmul_t"):
            return args[0], None
        return args[0], args[2] if len(args) > 2 else kw.get("bias")

    @property
    def m(self) -> int:
        return self.matrix.shape[0]

    @property
    def n(self) -> int:
        return self.matrix.shape[1]


def _ints(value: Any, dims: int) -> list[int] | None:
    if isinstance(value, int):
        return [value] * dims
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def _conv_site(node: fx.Node, name: str, w: torch.Tensor) -> Site | str:
    args = list(node.args) + [None] * (7 - len(node.args))
    stride, padding, dilation, groups = args[3:7]
    kw = node.kwargs
    stride = kw.get("stride", stride if stride is not None else 1)
    padding = kw.get("padding", padding if padding is not None else 0)
    dilation = kw.get("dilation", dilation if dilation is not None else 1)
    groups = kw.get("groups", groups if groups is not None else 1)
    dims = w.dim() - 2
    if groups != 1:
        return f"grouped conv (groups={groups})"
    if padding == "valid":
        padding = 0
    stride, dilation = _ints(stride, dims), _ints(dilation, dims)
    if padding == "same" and stride is not None and dilation is not None and all(
            s == 1 for s in stride) and all(k % 2 for k in w.shape[2:]):
        padding = [d * (k - 1) // 2 for d, k in zip(dilation, w.shape[2:])]
    padding = _ints(padding, dims)
    if None in (stride, padding, dilation):
        return "conv arguments are not constant ints (or asymmetric 'same' padding)"
    return Site(node, "conv", name, w, w.reshape(w.shape[0], -1), (stride, padding, dilation))


def find_site(node: fx.Node, ctx) -> Site | str | None:
    """The Site at `node`, a reason string if it is a site we cannot take, or None."""
    if node.op != "call_function":
        return None
    t = node.target
    if t in (torch._C._nn.linear, torch.nn.functional.linear):
        w_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        name = ctx.facts.weight_name(w_node)
        if name is None:
            return None
        w = ctx.facts.weight_value(w_node)
        return Site(node, "linear", name, w, w) if w.dim() == 2 else None
    if t is torch.addmm and len(node.args) == 3:
        name = ctx.facts.weight_name(node.args[2])
        if name is None:
            return None
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return f"{name}: addmm with alpha/beta != 1"
        w = ctx.facts.weight_value(node.args[2])
        return Site(node, "addmm", name, w, w.T)
    if t in (torch.matmul, operator.matmul) and len(node.args) == 2:
        view = node.args[1] if is_transpose(node.args[1]) else None
        w_node = view.args[0] if view is not None else node.args[1]
        name = ctx.facts.weight_name(w_node)
        w = ctx.facts.weight_value(w_node)
        if name is None or w.dim() != 2:
            return None
        if view is not None:  # x @ W.T is linear(x, W)
            return Site(node, "matmul_t", name, w, w, view=view)
        return Site(node, "matmul", name, w, w.T)
    if t in (torch.conv2d, torch.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv1d):
        name = ctx.facts.weight_name(node.args[1])
        if name is None:
            return None
        site = _conv_site(node, name, ctx.facts.weight_value(node.args[1]))
        return site if isinstance(site, Site) else f"{name}: {site}"
    return None


def _rows(site: Site) -> int:
    """Rows the example input pushes through the site (output positions), hints for SymInts."""
    shape = node_shape(site.node) or ()
    sizes = [int(s.node.hint) if isinstance(s, torch.SymInt) and s.node.hint is not None
             else (s if isinstance(s, int) else 1) for s in shape]
    if site.kind == "conv":
        return math.prod(sizes) // max(sizes[-site.weight.dim() + 1], 1) if sizes else 1
    return math.prod(sizes[:-1]) if sizes else 1


def _flops(site: Site, rank: int | None) -> int:
    rows, m, n = _rows(site), site.m, site.n
    if rank is None:
        return 2 * rows * m * n
    if site.kind == "conv":  # first conv runs at output positions too; 1x1 conv m*r per position
        return 2 * rows * rank * (n + m)
    return 2 * rows * rank * (m + n)


class LowRankPass(Pass):
    """Factorize weight sites; see the module docstring."""

    name = "low_rank"
    config_cls = LowRankConfig
    rewrites_weights = True

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        rows: list[SiteRow] = []
        candidates: list[tuple[Site, Factorization, torch.Tensor | None, str]] = []
        misses: list[str] = []  # calibration given but unusable at these sites
        for node in list(gm.graph.nodes):
            site = find_site(node, ctx)
            if site is None:
                continue
            if isinstance(site, str):
                name, _, why = site.partition(": ")
                rows.append(SiteRow(self.name, name, "skipped", why))
                continue
            why = self._ineligible(site, ctx)
            if why:
                rows.append(self._skip(site, why))
                continue
            moment, use, note = self._moment(site, ctx)
            if ctx.calibration is not None and moment is None:
                misses.append(note.removeprefix("plain SVD: "))
            fixed = self.config.rule in FIXED_RULES
            fixed_rank = self._fixed_rank(site)[0] if fixed else None
            if fixed and fixed_rank is None:
                candidates.append((site, None, moment, note))  # not profitable: no SVD needed
                continue
            try:
                fac = factorize(site.matrix, moment if use else None, rank=fixed_rank,
                                method=self.config.svd)
            except (RuntimeError, ValueError) as exc:  # e.g. an SVD that does not converge
                if ctx.config.strict:
                    raise
                rows.append(self._skip(site, f"factorization failed: {exc}"))
                continue
            candidates.append((site, fac, moment, note))
        ranks = self._choose_ranks(candidates)
        for site, fac, moment, note in candidates:
            rank, why = ranks[site.weight_name]
            if rank is None:
                rows.append(self._skip(site, why))
                continue
            if not fac.complete:
                note += f"; randomized SVD (top {fac.known_rank} factors only)"
            denied = ctx.claim(site.weight_name, [site.weight_name])
            if denied:
                rows.append(self._skip(site, denied))
                continue
            rows.append(self._rewrite(gm, ctx, site, fac, moment, rank, note))
        if misses:
            served = len(candidates) - len(misses)
            ctx.warn(f"the calibration serves {served} of {len(candidates)} sites (the rest "
                     f"fall back to a plain SVD), e.g. {misses[0]}")
        return PassResult(rows)

    # --- decisions -------------------------------------------------------------------------
    def _ineligible(self, site: Site, ctx) -> str:
        if not ctx.selected(site.weight_name):
            return "excluded by include/exclude filters"
        if site.kind == "conv" and not self.config.conv:
            return "conv sites are off (conv=False)"
        w_node = site.view.args[0] if site.view is not None else next(
            a for a in site.node.all_input_nodes if ctx.facts.weight_name(a) == site.weight_name)
        for n in (w_node, site.view):
            if n is not None and len(n.users) > 1:
                return f"weight is used by {len(n.users)} calls (tied weights)"
        if max_profitable_rank(site.m, site.n, self.config.min_saving) < 1:
            return f"too small to save parameters ({site.m}x{site.n})"
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
        r = min(cfg.rank, full) if cfg.rule == "rank" else math.ceil(
            (cfg.rank_ratio or DEFAULT_RANK_RATIO) * full)
        return self._profitable(site, r)

    def _profitable(self, site: Site, r: int) -> tuple[int | None, str]:
        cfg: LowRankConfig = self.config
        r = round_rank(max(r, 1), cfg.rank_multiple, min(site.m, site.n))
        limit = max_profitable_rank(site.m, site.n, cfg.min_saving)
        if r > limit:
            return None, (f"not profitable: {cfg.rule} asks rank {r}, above {limit} where "
                          f"r(m+n) <= {1 - cfg.min_saving:g} mn")
        return r, ""

    def _choose_ranks(self, candidates) -> dict[str, tuple[int | None, str]]:
        cfg: LowRankConfig = self.config
        if cfg.rule == "param_budget":
            return self._allocate(candidates)
        if cfg.rule in FIXED_RULES:
            return {site.weight_name: self._fixed_rank(site) for site, *_ in candidates}
        out: dict[str, tuple[int | None, str]] = {}
        for site, fac, _, _ in candidates:
            err = _full_curve(fac)
            if cfg.rule == "energy":
                r = int(((1 - err.pow(2)) >= cfg.energy - 1e-12).nonzero()[0].item())
            else:
                r = int((err <= cfg.max_error).nonzero()[0].item())
            out[site.weight_name] = self._profitable(site, r)
        return out

    def _allocate(self, candidates) -> dict[str, tuple[int | None, str]]:
        cfg: LowRankConfig = self.config
        mult = cfg.rank_multiple
        total = sum(s.m * s.n for s, *_ in candidates)
        budget = cfg.param_budget * total
        sites, out = [], {}
        for site, fac, _, _ in candidates:
            limit = max_profitable_rank(site.m, site.n, cfg.min_saving) // mult * mult
            if limit < mult:
                out[site.weight_name] = (None, f"not profitable at rank_multiple {mult}")
                budget -= site.m * site.n
            else:
                sites.append(BudgetSite(site.weight_name, site.m, site.n,
                                        _full_curve(fac), limit))
        for key, r in allocate(sites, budget, mult).items():
            out[key] = (r, "") if r is not None else (None, "kept dense by the param_budget allocator")
        return out

    # --- rewriting -------------------------------------------------------------------------
    def _skip(self, site: Site, why: str) -> SiteRow:
        size = site.m * site.n
        flops = _flops(site, None)
        return SiteRow(self.name, site.weight_name, "skipped", why, size, size, flops, flops)

    def _rewrite(self, gm, ctx, site: Site, fac: Factorization, moment, rank: int,
                 note: str) -> SiteRow:
        u64, v64 = fac.factors(rank)
        dtype, device = site.weight.dtype, site.weight.device
        u, v = u64.to(device=device, dtype=dtype), v64.to(device=device, dtype=dtype)
        if site.kind == "conv":
            spatial = site.weight.dim() - 2
            u = u.reshape(site.m, rank, *([1] * spatial))
            v = v.reshape(rank, *site.weight.shape[1:])
        hint = site.weight_name.removesuffix(".weight")
        v_node = ctx.add_constant(gm, v.contiguous(), derived_from=[site.weight_name],
                                  name_hint=f"{hint}.lr_v")
        u_node = ctx.add_constant(gm, u.contiguous(), derived_from=[site.weight_name],
                                  name_hint=f"{hint}.lr_u")
        x, bias = site.operands()
        with gm.graph.inserting_before(site.node):
            if site.kind == "conv":
                new = gm.graph.call_function(torch.ops.effc.low_rank_conv.default,
                                             (x, v_node, u_node, bias, *site.conv_args))
            else:
                new = gm.graph.call_function(torch.ops.effc.low_rank_linear.default,
                                             (x, v_node, u_node, bias))
        copy_node_meta(new, site.node)
        site.node.replace_all_uses_with(new)
        gm.graph.erase_node(site.node)
        if site.view is not None and not site.view.users:
            gm.graph.erase_node(site.view)
        error = weight_error(site.matrix, u64, v64)
        if moment is not None:
            error.update(output_error(site.matrix, u64, v64, moment))
        return SiteRow(self.name, site.weight_name, "rewritten", note,
                       site.m * site.n, rank * (site.m + site.n),
                       _flops(site, None), _flops(site, rank), error,
                       self._details(site, fac, rank))

    def _details(self, site: Site, fac: Factorization, rank: int) -> dict[str, Any]:
        err = fac.tail_rel_error()
        full = min(site.m, site.n)
        others = sorted({round_rank(max(1, int(rank * f)), self.config.rank_multiple, full)
                         for f in (0.25, 0.5, 2.0, 4.0)} - {rank})[: self.config.error_ranks]
        metric = "out_rel_fro" if fac.whitened else "weight_rel_fro"
        out = {"kind": site.kind, "rank": rank, "full_rank": full, "shape": [site.m, site.n],
               "rule": self.config.rule, "svd": fac.method,
               f"{metric}_at_rank": {str(r): round(err[r].item(), 6) for r in others + [rank]
                                     if r <= fac.known_rank}}
        if not fac.complete:  # say where the curve stops instead of extrapolating it
            out["error_known_up_to_rank"] = fac.known_rank
        return out


def _full_curve(fac: Factorization) -> torch.Tensor:
    """The error at every rank, which only a full spectrum gives (validate() keeps it so)."""
    if not fac.complete:
        raise ValueError(f"this rank rule needs the full spectrum, but the {fac.method} SVD "
                         f"computed only the top {fac.known_rank} factors")
    return fac.tail_rel_error()
