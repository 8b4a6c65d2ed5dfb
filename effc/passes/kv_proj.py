"""kv_proj: attention over a projected KV cache, run in the projected dimensions.

`effc.kv_cache(...)` (effc/projected_cache.py) stores K P_k and V P_v and hands attention the
rebuilt K P_k P_k^T and V P_v P_v^T: that saves memory, but every decode step rebuilds the
whole cache at full width. This pass finds that rebuild where it feeds
scaled_dot_product_attention and moves the projections to the single query and output row:

    softmax(s q (L_k P_k^T)^T) (L_v P_v^T) = softmax(s (q P_k) L_k^T) L_v  P_v^T

(per query head, with its KV head's bases; the scale s stays the original 1/sqrt(head_dim)).
A centered cache rebuilds L P^T + mu: the keys' mean adds s q.mu_k to every score of a query,
which softmax ignores, and the values' mean comes out as + mu_v, since each row of attention
weights sums to 1. Exact algebra; the attention then reads the r-wide cache directly. The
rebuild nodes become dead and are removed. Graphs without a projected cache are left as they
are (the report says so); the compression itself, and its knobs, belong to effc.kv_cache.
A prefill whose keys and values would end up unequally wide is not folded (SDPA's fused
kernels need one width); a folded prefill also gets the bases folded into its projections,
computed in the graph (kv_proj_weights.py).

Attention without a cache (encoders, ViTs, decoders called without one), given a calibration
with K/V moments: each attention whose k and v are projections split into heads runs in r
of d dimensions per head, with per-head PCA bases of the moments (constants of the graph,
so the same fold into the projections is computed once, at compile time).

`select` (TokenSelect, part 2 of kv_proj): every decode-step attention (one query token, no
mask) becomes effc.select_attention, which attends to the first `initial`, the last `recent`
and the `top_k` best-voted cached tokens (exact while the cache holds no more than that). With
`reuse` (TokenSelect's selection cache) it becomes effc.select_attention_reusing, which keeps
each attention's last selection (by the attention module's name) from one decode step to the
next (effc/token_select.py).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import operator
import re
from typing import ClassVar, Literal

import torch
import torch.fx as fx

import effc.kernels.select_attention  # noqa: F401  (registers torch.ops.effc.select_attention)
from effc.compiler.config import PassConfig, knob
from effc.compiler.calibration.observer import module_of
from effc.compiler.graph_facts import (add_constant, copy_node_meta, fqn_from_source, hinted,
                                       node_arg, node_value, remove_dead_code)
from effc.compiler.report import SiteRow
from effc.passes.base import Pass, PassResult
from effc.passes.kv_proj_math import choose_ranks, pca_basis, pca_errors, rank_options
from effc.passes.attention_sites import (MATMULS, NOT_HEADS, SDPA, heads_part, merge_chain,
                                         strip_to, unequal_attention)
from effc.passes.kv_proj_weights import (Fold, fold_in, fold_value_out, freeze_derived,
                                         store_of, worth_it)

_BASIS = re.compile(r"layers_(\d+)_(key|value)_basis")
_MEAN = re.compile(r"layers_(\d+)_(key|value)_mean")
COMPRESSION_KNOBS = ("ratio", "budget", "min_energy", "keys", "values", "multiple", "bases",
                     "center")


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """How many cached tokens a decode step attends to: initial + recent + top_k."""

    top_k: int = 256
    initial: int = 4
    recent: int = 64
    reuse: float | None = None  # reuse the last selection while queries keep this cosine

    def __post_init__(self) -> None:
        for key in ("top_k", "initial", "recent"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"effc option 'kv_proj.select.{key}': expected an int >= 0, "
                                 f"got {value!r}")
        if self.reuse is not None and (isinstance(self.reuse, bool) or not isinstance(
                self.reuse, (int, float)) or not -1.0 <= self.reuse <= 1.0):
            raise ValueError(f"effc option 'kv_proj.select.reuse': expected None or a cosine "
                             f"in [-1, 1], got {self.reuse!r}")
        if self.top_k + self.initial + self.recent == 0:
            raise ValueError("effc option 'kv_proj.select': top_k + initial + recent must be "
                             "> 0")

    @property
    def budget(self) -> int:
        return self.top_k + self.initial + self.recent


@dataclasses.dataclass(frozen=True)
class KVProjConfig(PassConfig):
    """kv_proj's knobs: `effc.kv_cache(model, calib, **knobs)` or `effc.KVProjConfig(...)`."""

    option_key: ClassVar[str] = "kv_proj"

    ratio: float | None = knob(None, "fraction of head_dim kept for keys and values alike",
                               min=0.0, max=1.0, min_exclusive=True)
    budget: float | None = knob(None, "fraction of the KV cache's bytes kept, allocated over "
                                "layers and keys/values", min=0.0, max=1.0, min_exclusive=True)
    min_energy: float = knob(0.99, "the default: the least rank keeping this share of each "
                             "layer's key (score) and value energy", min=0.0, max=1.0,
                             min_exclusive=True)
    keys: Literal["auto", "pca", "latent", "pairs", "none"] = knob(
        "auto", "pca: a PCA basis of the keys the cache stores (after RoPE); latent: a PCA "
                "basis of the keys before RoPE (W_k x), rotated at rebuild (Palu's way); "
                "pairs: whole RoPE planes (commutes with the rotation, so it could fold into "
                "W_q/W_k; measured worse); none: keys kept whole; auto: latent for RoPE models with "
                "k_proj/v_proj linears, else pca")
    values: bool = knob(True, "project the values too")
    bases: Literal["auto", "calibration", "weights"] = knob(
        "auto", "calibration: PCA of the recorded per-head K/V moments; weights: data-free, "
                "from W_k/W_v (and the recorded input moments where present; RoPE averaged "
                "over positions); auto: calibration when it holds K/V moments")
    center: bool | Literal["auto"] = knob(
        "auto", "subtract the calibration's per-head mean before projecting and add it back at "
                "rebuild (never more error at equal rank); auto: PCA keys and values wherever "
                "the calibration recorded means; True: the same, an error without them; False: "
                "never")
    multiple: int = knob(2, "ranks are multiples of this (pairs: of 2)", min=1)
    fold_weights: bool = knob(
        True, "in graphs that project enough tokens (prefills), fold the bases into the "
              "projections: values into v_proj and o_proj, keys without RoPE into k_proj and "
              "q_proj (computed in the graph from the cache's bases)")
    select: bool | dict = knob(
        False, "decode steps attend to selected cached tokens: True, or a dict of top_k "
               "(256), initial (4), recent (64); False: every cached token")

    def validate(self, key: str) -> None:
        if self.ratio is not None and self.budget is not None:
            raise ValueError(f"effc option {key!r}: give one of ratio, budget; got both")
        self.selection  # noqa: B018  (raises ValueError naming the bad select key)

    @property
    def selection(self):
        """The validated token-selection settings, or None when `select` is off."""
        if self.select is False:
            return None
        given = {} if self.select is True else dict(self.select)
        unknown = set(given) - {"top_k", "initial", "recent", "reuse"}
        if unknown:
            raise ValueError(f"effc option 'kv_proj.select': unknown keys {sorted(unknown)}; "
                             f"accepted: top_k, initial, recent, reuse")
        return SelectConfig(**given)



def _basis_of(node, pattern: re.Pattern = _BASIS) -> tuple[fx.Node, str] | None:
    """(placeholder, its layer index) if `node` is a cache layer's basis (or, with _MEAN, its
    mean), or that `.to(...)`."""
    node = strip_to(node)
    if isinstance(node, fx.Node) and node.op == "placeholder":
        found = pattern.search(node.name)
        if found:
            return node, found.group(1)
    return None


def rebuild(node) -> tuple[fx.Node, fx.Node, str, fx.Node | None] | None:
    """(latent cache L, basis P, layer, mean mu or None) if `node` is `L @ P^T`, a projected
    cache's rebuild, or `L @ P^T + mu`, a centered one's."""
    mean = None
    if (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target in (operator.add, torch.add) and len(node.args) == 2
            and not node.kwargs and _basis_of(node.args[1], _MEAN) is not None):
        node, mean = node.args[0], node.args[1]
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in MATMULS):
        return None
    lat, t = node.args[0], node.args[1]
    if not (isinstance(t, fx.Node) and t.op == "call_method" and t.target == "transpose"
            and set(t.args[1:]) == {-1, -2}):
        return None
    basis = _basis_of(t.args[0])
    return (lat, t.args[0], basis[1], mean) if basis is not None else None


def _repeat_kv(node) -> tuple[fx.Node, int] | None:
    """(X, n) if `node` is transformers' repeat_kv(X, n), X[:, :, None].expand(B, G, n, T, d)
    .reshape(B, G n, T, d): how its SDPA attention repeats KV heads for grouped queries when
    a mask is given. Each KV head's n copies are adjacent, as repeat_interleave(X, n, 1)."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "reshape"):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method"
            and expand.target == "expand" and len(expand.args) == 6 and len(node.args) == 5):
        return None
    item = expand.args[0]
    whole = slice(None)
    if not (isinstance(item, fx.Node) and item.op == "call_function"
            and item.target is operator.getitem
            and item.args[1] == (whole, whole, None, whole, whole)):
        return None
    n = expand.args[3]
    return (item.args[0], n) if isinstance(n, int) and n > 1 else None


def cached(node) -> tuple[fx.Node, fx.Node, str, fx.Node | None, int] | None:
    """rebuild(node) + (1,), or, through a repeat_kv of a rebuild, rebuild(X) + (n,)."""
    found = rebuild(node)
    if found is not None:
        return found + (1,)
    repeated = _repeat_kv(node)
    found = rebuild(repeated[0]) if repeated is not None else None
    return found + (repeated[1],) if found is not None else None


def _leading(node) -> torch.Size | None:
    """The [B, H, T] of an attention operand: its traced value's, or, for a query the fold
    multiplied by a basis (a new node, with no traced value), the query's it multiplied."""
    while isinstance(node, fx.Node):
        value = node_value(node)
        if isinstance(value, torch.Tensor):
            return value.shape[:3]
        if node.op != "call_function" or node.target not in MATMULS:
            return None
        node = node.args[0]
    return None


def _module_name(node: fx.Node) -> str | None:
    """The name of the module that called `node` (`model.layers.0.self_attn`), as the
    compiled model's named_modules() says it."""
    stack = node.meta.get("nn_module_stack")  # paths like L['args'][0].model.layers.0.self_attn
    return fqn_from_source(list(stack.values())[-1][0]) if stack else None


def _width(found, sdpa: fx.Node) -> int:
    """How wide the keys or values an attention reads are once folded: the basis's rank,
    or the query's head size where the cache keeps them whole."""
    if found is not None:
        return node_value(found[1]).shape[-1]
    return node_value(sdpa.args[0]).shape[-1]


def _widths(sdpa: fx.Node, keys, values) -> tuple[int | None, int, int]:
    """(query tokens or None where unknown, key width, value width) of an attention once
    folded. Unequal widths leave SDPA's fused kernels (on a 2-core CPU, 1,024 causal tokens
    took 18 ms at widths 16 and 24 against 2.5 ms at 32 and 32 and 1.5 ms at 16 and 16), so
    such a prefill is not folded (rebuilding its cache costs about one projection), and such
    a decode step, where the rebuild of every cached token is what costs, is folded to
    unequal_attention."""
    q = _leading(sdpa.args[0])
    return (q[2] if q is not None else None), _width(keys, sdpa), _width(values, sdpa)


def _direct_costs(shapes, parts, folded: list[str], widths: dict, d: int, out_proj
                  ) -> tuple[int, int, int, int]:
    """(params before, after, FLOPs before, after) of an attention run in fewer dimensions:
    the scores and the weighted sum (2 per multiply-add, as every report row counts), and
    the projections folded (q, k, v by their heads' widths; o by the values')."""
    (b, h, t, _), (_, _, tk, _) = shapes
    before = b * h * t * tk * 2 * d
    after = b * h * t * tk * (widths["keys"] + widths["values"])
    params_before = params_after = 0
    for role, part, width in zip(("q_proj", "k_proj", "v_proj"), parts,
                                 (widths["keys"], widths["keys"], widths["values"])):
        if role in folded:
            heads = (part.stop - part.start) // d
            inputs = hinted(node_value(part.proj.x).shape[-1])
            params_before += inputs * heads * d
            params_after += inputs * heads * width
            rows = b * (t if role == "q_proj" else tk)
            before += rows * inputs * heads * d
            after += rows * inputs * heads * width
    if "o_proj" in folded and out_proj is not None:
        outs = hinted(node_value(out_proj.w).shape[1 if out_proj.io else 0])
        params_before += h * d * outs
        params_after += h * widths["values"] * outs
        before += b * t * h * d * outs
        after += b * t * h * widths["values"] * outs
    return params_before, params_after, 2 * before, 2 * after


def _scale(sdpa: fx.Node):
    """The softmax scale an SDPA call uses: its `scale`, else 1/sqrt of the query's head dim."""
    scale = node_arg(sdpa, 6, "scale")
    return scale if scale is not None else float(node_value(sdpa.args[0]).shape[-1]) ** -0.5


class KVProjPass(Pass):
    """Attention in the projected dimensions of an effc.kv_cache; see the module docstring."""

    name = "kv_proj"
    config_cls = KVProjConfig

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        cfg: KVProjConfig = self.config
        rows, direct = [], []
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in SDPA:
                continue
            if len(node.args) < 3:
                rows.append(SiteRow(self.name, f"attention:{node.name}", "skipped",
                                    "query, key and value passed by keyword"))
                continue
            keys, values = cached(node.args[1]), cached(node.args[2])
            if keys is None and values is None:  # no projected cache: a calibrated projection?
                found = self._direct_site(node, ctx)
                (rows if isinstance(found, SiteRow) else direct).append(found)
                continue
            layer = (keys or values or (None,) * 5)[2]
            site = f"cache.layers.{layer}" if layer is not None else f"attention:{node.name}"
            tokens, rk, rv = _widths(node, keys, values)
            why = ("excluded by filters" if not ctx.selected(site) else
                   "dropout in attention" if node_arg(node, 4, "dropout_p", 0.0) else
                   f"a prefill of {tokens} tokens with keys {rk} and values {rv} wide: SDPA's "
                   f"fused kernels need equal widths, so rebuilding the cache to "
                   f"{node_value(node.args[0]).shape[-1]} is faster here"
                   if tokens not in (None, 1) and rk != rv else "")
            if why:
                rows.append(SiteRow(self.name, site, "skipped", why))
                continue
            # a decode step with unequal widths attends without SDPA's fused kernels (unless
            # the selection replaces that attention anyway)
            narrow = (cfg.selection is None and tokens == 1 and rk != rv
                      and not node_arg(node, 5, "is_causal", False))
            rows.append(self._fold(graph, node, keys, values, site, cfg.fold_weights, narrow))
        given = [k for k in COMPRESSION_KNOBS
                 if getattr(cfg, k) != KVProjConfig.__dataclass_fields__[k].default]
        over_cache = any(r.site.startswith("cache.") for r in rows)
        if given and over_cache:
            ctx.warn(f"the knobs {', '.join(given)} choose the projections of effc.kv_cache "
                     f"and of attention without a cache; over a projected cache, kv_proj runs "
                     f"attention in that cache's dimensions (build it with "
                     f"effc.kv_cache(model, calibration, ...))")
        if direct:
            rows += self._project_direct(gm, ctx, direct)
        if rows and not over_cache and cfg.selection is None and not any(
                r.decision == "rewritten" for r in rows):
            top = "; ".join(f"{n}x {why}" for why, n in
                            collections.Counter(r.reason for r in rows).most_common(2))
            ctx.warn(f"rewrote none of the {len(rows)} attentions of this graph "
                     f"({top}). It runs attention over an effc.kv_cache (build it with "
                     f"effc.kv_cache(model, calibration, ...)"
                     + (f"; the knobs {', '.join(given)} choose its projections" if given
                        else "") + "), or attention without a cache given "
                     "calibration=effc.calibrate(model, batches, what=('inputs', 'kv'))")
        if cfg.selection is not None:
            rows += self._select(gm, ctx, cfg.selection)
        if rows:
            remove_dead_code(graph)
        return PassResult(rows)

    def _direct_site(self, node: fx.Node, ctx) -> dict | SiteRow:
        """An attention without a projected cache whose keys and values are projections
        split into heads, and whose module the calibration holds K/V moments of: a site to
        run in fewer dimensions per head (encoders; decoders without a cache)."""
        cfg: KVProjConfig = self.config
        parts = [heads_part(a) for a in node.args[:3]]
        if isinstance(parts[1], str) or isinstance(parts[2], str):
            return SiteRow(self.name, f"attention:{node.name}", "skipped",
                           "no projected cache rebuild feeds this attention (pass the model an "
                           "effc.kv_cache), and its keys and values are not projections split "
                           "into heads (a transformers cache, RoPE, or repeated KV heads)")
        weight = ctx.facts.weight_name(parts[1].proj.w)
        module = module_of(weight) if weight else node.name
        site = f"attention:{module}"
        calib = ctx.calibration
        stats = (None, None) if calib is None else (calib.keys.get(module),
                                                   calib.values.get(module))
        why = ("excluded by filters" if not ctx.selected(site) else
               "dropout in attention" if node_arg(node, 4, "dropout_p", 0.0) else
               "no calibration with its key/value moments: pass "
               "calibration=effc.calibrate(model, batches, what=('inputs', 'kv'))"
               if None in stats else
               "data-free bases (bases='weights') are for effc.kv_cache; attention without "
               "a cache is projected from calibration moments" if cfg.bases == "weights" else
               "keys='none' and values=False leave nothing to project"
               if cfg.keys == "none" and not cfg.values else "")
        if why:
            return SiteRow(self.name, site, "skipped", why)
        # the queries need not be a projection: they are then multiplied by P_k in the graph
        names = [ctx.facts.weight_name(p.proj.w) for p in parts if not isinstance(p, str)]
        chain = merge_chain(node, tuple(hinted(s) for s in node_value(node).shape))
        out_proj = None if isinstance(chain, str) else chain[1]  # the values fold into it
        if out_proj is not None:
            names.append(ctx.facts.weight_name(out_proj.w))
        why = ctx.claim(site, sorted({n for n in names if n}))
        if why:
            return SiteRow(self.name, site, "skipped", why)
        return {"node": node, "site": site, "parts": parts, "stats": stats,
                "out_proj": out_proj}

    def _project_direct(self, gm: fx.GraphModule, ctx, found: list[dict]) -> list[SiteRow]:
        """Ranks for every direct site at once (ratio, budget or min_energy, over the error
        of keys and values together: one rank for both, so SDPA keeps its fused kernels),
        then each site's attention over (K - mu_k) P_k and (V - mu_v) P_v, folded as a
        projected cache's is (see _project_site)."""
        cfg: KVProjConfig = self.config
        roles = [w for w, on in (("keys", cfg.keys != "none"), ("values", cfg.values)) if on]
        options = []
        for f in found:
            for role, stats in zip(("keys", "values"), f["stats"]):
                f[role] = (stats.moment(), stats.mean() if cfg.center is not False else None)
            f["errors"] = {w: pca_errors(*f[w]) for w in roles}
            g, d = f["keys"][0].shape[0], f["keys"][0].shape[-1]
            joint = [math.sqrt(sum(f["errors"][w][r] ** 2 for w in roles) / len(roles))
                     for r in range(d + 1)]
            size = node_value(f["parts"][1].proj.w).element_size()
            options.append(rank_options(f["site"], joint, d, g * len(roles), cfg.multiple,
                                        size))
        choice = choose_ranks(options, cfg)
        seeds: set[fx.Node] = set()
        rows = [self._project_site(gm, f, roles, choice[o.key].choice, seeds)
                for f, o in zip(found, options)]
        freeze_derived(gm, ctx, seeds)  # the folded weights, computed once, here
        return rows

    def _project_site(self, gm: fx.GraphModule, f: dict, roles: list[str], r: int,
                      seeds: set) -> SiteRow:
        """One direct site at rank r: the bases and means become constants of the graph,
        the attention reads (K - mu_k) P_k and (V - mu_v) P_v, and _fold moves P_k to the
        queries and P_v^T after the attention, folding them into the projections."""
        cfg: KVProjConfig = self.config
        node, graph = f["node"], gm.graph
        g, d = f["keys"][0].shape[0], f["keys"][0].shape[-1]
        errors = {w: round(f["errors"][w][r], 6) for w in roles}
        if r >= d:
            return SiteRow(self.name, f["site"], "skipped",
                           f"keeps all {d} dimensions per head (the rule asks for more "
                           f"than {d - cfg.multiple})", details={"head_dim": d})
        w = node_value(f["parts"][1].proj.w)
        found = {}
        with graph.inserting_before(node):
            for role, arg in (("keys", node.args[1]), ("values", node.args[2])):
                if role not in roles:
                    found[role] = None
                    continue
                moment, mean = f[role]
                const = lambda t, what: add_constant(  # noqa: E731
                    gm, t.to(device=w.device, dtype=w.dtype), f"{f['site']}.{role}_{what}")
                basis = const(pca_basis(moment, r, mean), "basis")
                mu = const(mean.reshape(g, 1, d), "mean") if mean is not None else None
                seeds.update(n for n in (basis, mu) if n is not None)
                x = graph.call_function(operator.sub, (arg, mu)) if mu is not None else arg
                store = graph.call_function(operator.matmul, (x, basis))
                found[role] = (store, basis, f["site"], mu, 1)
        shapes = [tuple(hinted(s) for s in node_value(a).shape) for a in (node, node.args[1])]
        row = self._fold(graph, node, found["keys"], found["values"], f["site"],
                         cfg.fold_weights)
        folded = row.details.get("folded") or []
        widths = {"keys": r if "keys" in roles else d, "values": r if "values" in roles else d}
        costs = _direct_costs(shapes, f["parts"], folded, widths, d, f["out_proj"])
        return SiteRow(self.name, f["site"], "rewritten",
                       f"attention in {r} of {d} dimensions per head for the "
                       f"{' and '.join(roles)} (PCA bases of the calibration's moments"
                       f"{', centered' if cfg.center is not False else ''}); "
                       + (f"folded into {', '.join(folded)}" if folded else
                          "projected in the graph ("
                          + row.details.get("not_folded", "fold_weights=False") + ")"),
                       *costs, error={f"{w}_rel_error": e for w, e in errors.items()},
                       details={**row.details, "rank": r, "head_dim": d, "kv_heads": g,
                                **{f"{w}_error": e for w, e in errors.items()}})

    def _select(self, gm: fx.GraphModule, ctx, sel) -> list[SiteRow]:
        """Each decode-step attention -> effc.select_attention (see the module docstring)."""
        rows = []
        for i, node in enumerate(n for n in list(gm.graph.nodes)
                                 if n.op == "call_function" and n.target in SDPA):
            site = f"select:attention.{i}"
            q, k = _leading(node.args[0]), _leading(node.args[1])
            why = ("excluded by filters" if not ctx.selected(site) else
                   "the query's or the keys' shape is not known" if q is None or k is None else
                   f"a query of {q[2]} tokens (a prefill): selection is for decode steps"
                   if q[2] != 1 else
                   "an attention mask (padding or a custom mask) is given"
                   if node_arg(node, 3, "attn_mask") is not None else
                   "dropout in attention" if node_arg(node, 4, "dropout_p", 0.0) else
                   "is_causal with one query attends to the first token only"
                   if node_arg(node, 5, "is_causal", False) else
                   f"query heads ({q[1]}) are not a multiple of the KV heads ({k[1]})"
                   if q[1] % k[1] else "")
            if why:
                rows.append(SiteRow(self.name, site, "skipped", why))
                continue
            args = (node.args[0], node.args[1], node.args[2], float(_scale(node)), sel.top_k,
                    sel.initial, sel.recent)
            with gm.graph.inserting_before(node):
                if sel.reuse is None:
                    new = gm.graph.call_function(torch.ops.effc.select_attention.default, args)
                else:  # the selection cache: the op keeps each attention's last selection
                    import effc.token_select  # noqa: F401  (registers the op)
                    new = gm.graph.call_function(
                        torch.ops.effc.select_attention_reusing.default,
                        args + (float(sel.reuse), _module_name(node) or site))
            copy_node_meta(new, node)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            rows.append(SiteRow(self.name, site, "rewritten",
                                f"a decode step attends to at most {sel.budget} cached tokens "
                                f"(first {sel.initial}, last {sel.recent}, top {sel.top_k} by "
                                f"the heads' soft vote); exact while the cache is no longer"
                                + (f"; a selection is reused while the queries keep cosine "
                                   f">= {sel.reuse}" if sel.reuse is not None else ""),
                                details={"top_k": sel.top_k, "initial": sel.initial,
                                         "recent": sel.recent, "reuse": sel.reuse}))
        return rows

    def _fold(self, graph: fx.Graph, node: fx.Node, keys, values, site: str,
              fold_weights: bool = True, narrow: bool = False) -> SiteRow:
        q = node.args[0]
        scale = _scale(node)
        heads = node_value(q).shape[1]

        def per_head(basis: fx.Node) -> fx.Node:
            """[G, ...] -> [H, ...]: each query head reads its KV head's basis (or mean)."""
            groups = node_value(basis).shape[0]
            if groups == heads:
                return basis
            return graph.call_function(torch.repeat_interleave, (basis,),
                                       {"repeats": heads // groups, "dim": 0})

        shape = node_value(node).shape  # [B, H, T, d]
        queries = None  # (the queries' heads, the node that projects them into the key basis)
        with graph.inserting_before(node):
            if keys is not None:
                queries = (q, graph.call_function(torch.matmul, (q, per_head(keys[1]))))
                q = queries[1]
            def latent(found, whole):
                """The r-wide cache, its KV heads repeated as the attention repeated them."""
                if found is None:
                    return whole
                return found[0] if found[4] == 1 else graph.call_function(
                    torch.repeat_interleave, (found[0],), {"repeats": found[4], "dim": 1})

            args = (q, latent(keys, node.args[1]), latent(values, node.args[2])) + tuple(
                node.args[3:])
            if narrow:  # SDPA's fused kernels need one width: attend without them
                new = out = graph.call_function(unequal_attention, args[:3], {
                    "attn_mask": node_arg(node, 3, "attn_mask"), "scale": scale})
            else:
                new = out = graph.call_function(node.target, args, {**node.kwargs,
                                                                    "scale": scale})
            pv = pm = None
            if values is not None:
                pv = per_head(values[1])
                pm = per_head(values[3]) if values[3] is not None else None
                out = graph.call_function(torch.matmul, (new, graph.call_method(
                    "transpose", (pv, -1, -2))))
                if pm is not None:  # the value mean, [G, 1, d] -> [H, 1, d]
                    out = graph.call_function(operator.add, (out, pm))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        what = " and ".join(w for w, f in (("keys", keys), ("values", values)) if f is not None)
        details = {"keys": keys is not None, "values": values is not None}
        if fold_weights:
            details.update(self._fold_weights(graph, keys, values, queries, new, out, pv, pm,
                                              shape, heads))
        return SiteRow(self.name, site, "rewritten",
                       f"attention reads the projected {what} directly (queries times P_k, "
                       f"output times P_v^T) instead of rebuilding them to full width"
                       + (f"; the bases are folded into {', '.join(details['folded'])}"
                          if details.get("folded") else ""), details=details)

    @staticmethod
    def _fold_weights(graph: fx.Graph, keys, values, queries, attn: fx.Node, out: fx.Node,
                      pv, pm, shape: torch.Size, heads: int) -> dict:
        """The bases folded into the projections where the graph projects enough tokens
        (kv_proj_weights): keys into k_proj and the queries' basis into q_proj, values into
        v_proj and o_proj. {"folded": [roles], "not_folded": reasons}."""
        shape = tuple(hinted(s) for s in shape)
        tokens = shape[0] * shape[2]
        found = keys or values
        _, d, r = (hinted(s) for s in node_value(found[1]).shape)
        if not worth_it(tokens, d, r):
            return {"folded": [], "not_folded": f"{tokens} tokens: computing the folded "
                    f"weights would cost more than it saves (decode steps)"}
        folds, why = [], []
        for role, cache in (("k_proj", keys), ("v_proj", values)):
            if cache is None:
                continue
            store = store_of(graph, cache[1], cache[3], queries or ())
            part = heads_part(store[1]) if not isinstance(store, str) else store
            if isinstance(part, str):
                why.append(f"{role}: the {'keys' if cache is keys else 'values'} the cache "
                           f"stores are {part}" + (" (RoPE rotates them in between)"
                                                   if part == NOT_HEADS else ""))
            else:
                folds.append(Fold(role, part, store[0], strip_to(cache[1]), store[2]))
        if queries is not None:
            part = heads_part(queries[0])
            if isinstance(part, str):
                why.append(f"q_proj: the queries are {part} (RoPE rotates them in between)"
                           if part == NOT_HEADS else f"q_proj: {part}")
            else:
                groups = node_value(keys[1]).shape[0]
                folds.append(Fold("q_proj", part, queries[1], strip_to(keys[1]), None,
                                  heads // groups))
        fold_in(graph, folds)
        folded = [r for r in ("q_proj", "k_proj", "v_proj") if any(f.role == r for f in folds)]
        if values is not None:
            chain = merge_chain(out, shape)
            if isinstance(chain, str):
                why.append(f"o_proj: {chain}")
            else:
                fold_value_out(graph, attn, chain[1], pv, pm, heads, d,
                               hinted(node_value(values[1]).shape[-1]))
                folded.append("o_proj")
        return {"folded": folded, **({"not_folded": "; ".join(why)} if why else {})}
