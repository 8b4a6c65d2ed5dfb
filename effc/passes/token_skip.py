"""token_skip: Mixture-of-Depths routing around residual MLP blocks (gamma-MoD), training-free.

At a residual site `h = x + f(x)` (residual_sites.py) only some tokens go through f: a router
scores each token from x (a ridge fit to the norm of the block's update on calibration data,
token_skip_math.py), the chosen rows are gathered into a compact batch, f runs on it, and its
output is added back at those rows (effc.token_route / token_gather / token_scatter_add); the
other tokens keep x. Routing is top-k per sequence (ceil(capacity * T) tokens) where the graph
is not causal, and a per-token threshold set on calibration scores where it is (a decoder: a
causal attention or a KV cache), so a token's route never depends on later tokens and decode
steps route one token at a time. `capacity: 0` drops the block (layer dropping).

Which sites and capacities: `capacity` on the chosen `layers` ("auto": every eligible layer,
or the `max_layers` least sensitive), a `budget` of token work allocated across sites by the
shared allocator, or, by default, as much skipping as keeps the graph's main output at
`min_sqnr_db` (25 dB). Every candidate's effect is measured end to end on the calibration's
sample inputs (else on the call being compiled, with a warning). The first and last layers
are kept unless named. Attention blocks and whole layers (attention, then MLP, one routing)
are routed in encoders, ViTs and decoders (`blocks`); a routed attention's queries attend to
all tokens' keys (`keys="all"`) or only the routed ones (token_skip_attention.py; in a
decoder, skipped tokens then write no keys and values: at batch 1 the layer's cache holds
the routed tokens alone, at batch > 1 a row per token whose skipped rows are marked and
hidden; an encoder's padding mask keeps the routed tokens' part). Trained routers (a
Mixture-of-Depths model's) load from a file (`router`), with their updates scaled by
sigmoid(score) (`residual_weight`) as such routers are trained.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

import effc.kernels.token_gather  # noqa: F401  (registers torch.ops.effc.token_*)
from effc.compiler.config import PassConfig, knob
from effc.compiler.graph_facts import (ROWS_VARY, GraphFacts, ValueCapture, add_constant,
                                       copy_graph_module, copy_node_meta, remove_dead_code)
from effc.compiler.report import SiteRow
from effc.passes.base import Pass, PassResult
from effc.passes.budget import (DEFAULT_MIN_SQNR_DB, MAX_CHECKS, Candidate, EndToEnd,
                                SiteOptions, allocate, db, end_to_end)
from effc.passes.residual_sites import (ADDS, ResidualSite, flatten_token_sizes, layer_index,
                                        layer_sites, residual_sites)
from effc.passes.token_skip_attention import (compact_branch, compact_problem, is_causal,
                                              masked, masks_are_causal, queries_at_attention,
                                              queries_only, queries_problem, routed_masks)
from effc.passes.token_skip_math import (Router, arank, fit_router, load_routers, overlap,
                                         per_sequence, routed_of, routed_positions,
                                         select_rows, threshold)

CAPACITIES = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)  # candidates of budget/default
MAX_TOKENS = 1 << 16  # calibration tokens per site the router is fitted on


@dataclasses.dataclass(frozen=True)
class TokenSkipConfig(PassConfig):
    """token_skip's knobs: `options={"token_skip": {"capacity": 0.875}}`."""

    option_key: ClassVar[str] = "token_skip"

    capacity: float | None = knob(None, "fraction of tokens each converted block processes "
                                  "(0: drop the block)", min=0.0, max=1.0)
    budget: float | None = knob(None, "fraction of the eligible blocks' token work to keep, "
                                "allocated across sites by measured end-to-end effect",
                                min=0.0, max=1.0)
    min_sqnr_db: float | None = knob(None, "skip as much as keeps the graph's main output at "
                                     "this SQNR (dB); the default rule, at 25", min=0.0)
    blocks: tuple[Literal["mlp", "attention", "layer"], ...] = knob(
        ("mlp",), "which residual blocks may be routed: mlp, attention, or a whole layer "
                  "(attention then MLP, one routing)")
    keys: Literal["all", "selected"] = knob(
        "all", "attention blocks: the routed tokens attend to all tokens' keys, or only to "
               "the routed ones (Mixture-of-Depths proper: the least work; in decoders, a "
               "skipped token then writes no keys and values to the cache)")
    layers: Literal["auto"] | tuple[int, ...] = knob(
        "auto", "layer indices to convert, or auto: the eligible ones (not the first and last)")
    max_layers: int | None = knob(None, "auto: convert at most this many layers, least "
                                  "sensitive first", min=0)
    layer_choice: Literal["measured", "arank"] = knob(
        "measured", "which layers max_layers keeps: measured: least end-to-end error first; "
                    "arank: lowest ARank first (gamma-MoD; calibrate with what=('inputs', "
                    "'attention'))")
    routing: Literal["auto", "top_k", "threshold"] = knob(
        "auto", "top_k: ceil(capacity*T) tokens per sequence; threshold: per token, causal; "
                "auto: threshold in causal graphs (decoders), top_k otherwise")
    max_forwards: int = knob(512, "bound on the graph runs that measure candidates", min=1)
    router: str = knob(
        "fit", "fit: a ridge router per site, fitted on calibration data; or the path of a "
               "torch.save file of trained routers, {site name: {'weight': [d], 'bias': b}} "
               "(site names as the report lists them); sites it does not name are kept whole")
    residual_weight: Literal["none", "sigmoid"] = knob(
        "none", "sigmoid: a routed token's update is scaled by sigmoid(its router score), "
                "x + sigmoid(r) f(x), as Mixture-of-Depths trains its routers; none: x + f(x)")

    def validate(self, key: str) -> None:
        given = [k for k in ("capacity", "budget", "min_sqnr_db") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"effc option {key!r}: give one of capacity, budget, min_sqnr_db; "
                             f"got {', '.join(given)}")
        if self.layers != "auto" and any(i < 0 for i in self.layers):
            raise ValueError(f"effc option '{key}.layers': expected layer indices >= 0 or "
                             f"'auto', got {self.layers!r}")
        if self.router != "fit":
            load_routers(self.router, f"{key}.router")  # a bad file fails here, named


@dataclasses.dataclass
class _Plan:
    """One site's routing: the router, and the capacity and threshold it runs at."""

    router: Router
    capacity: float
    threshold: float | None  # None: top-k
    keys: str = "all"        # attention blocks: the keys the routed queries see
    weighted: bool = False   # updates scaled by sigmoid(router score)
    info: dict = dataclasses.field(default_factory=dict)  # what the deciding graph measured


def route_site(gm: fx.GraphModule, site: ResidualSite, plan: _Plan, ctx=None,
               derived_from: tuple[str, ...] = ()) -> fx.Node:
    """Rewrite `site` in `gm` so that only the routed tokens go through its branch; the node
    that now holds the add's value (a later site whose stream was the add reads it). The
    branch's nodes and the new ones are marked ROWS_VARY: their fake values still hold every
    token (the output, which does, has the add's)."""
    before = set(gm.graph.nodes) - set(site.branch) - {site.add}  # (a layer keeps its add)
    out = _route_site(gm, site, plan, ctx, derived_from)
    for n in gm.graph.nodes:
        if n not in before and n is not out:
            n.meta[ROWS_VARY] = True
    return out


def _route_site(gm: fx.GraphModule, site: ResidualSite, plan: _Plan, ctx,
                derived_from: tuple[str, ...]) -> fx.Node:
    graph = gm.graph
    if plan.capacity <= 0.0:  # the whole block is dropped
        site.add.replace_all_uses_with(site.stream)
        graph.erase_node(site.add)
        for n in reversed(site.branch):
            if not n.users and not n.is_impure():
                graph.erase_node(n)
        return site.stream
    d = site.features
    stream = site.stream.meta.get("example_value")
    known = isinstance(stream, torch.Tensor)
    lead = tuple(stream.shape[:-1]) if known else ()
    # the router computes where the stream is (a GPU graph can also take CPU inputs)
    weight = plan.router.weight.to(stream.device if known else ctx.device if ctx else "cpu")
    if ctx is not None:
        w_node = ctx.add_constant(gm, weight, derived_from=list(derived_from),
                                  name_hint=f"{site.name}.router")
    else:
        w_node = add_constant(gm, weight, f"{site.name}.router")
    first = site.branch[0]
    ops = torch.ops.effc
    # a decoder's attention (its keys and values feed the cache), or a masked encoder's: the
    # routed tokens' queries alone are computed, and attend
    at_attention = site.kind == "attention" and plan.keys == "all" and (
        plan.threshold is not None or masked(site))
    compact = plan.threshold is not None and (  # a decoder's block on its routed tokens
        site.kind == "layer" or site.kind == "attention" and plan.keys == "selected")
    # at batch > 1 (or a batch not known until run time) each sequence routes its own
    # number of tokens: K rows per sequence, the most any routes, fillers marked
    each_own = compact and not (known and isinstance(lead[0], int) and lead[0] == 1)
    with graph.inserting_before(first):
        x2d = graph.call_method("reshape", (site.stream, (-1, d)))
        scores = graph.call_function(torch.mv, (graph.call_method("float", (x2d,)), w_node))
        scores = graph.call_function(torch.add, (scores, plan.router.bias))
        tokens = graph.call_method("size", (site.stream, -2))
        scores = graph.call_method("reshape", (scores, (-1, tokens)))
        index = graph.call_function(ops.token_route.default,
                                    (scores, float(plan.capacity), plan.threshold))
        batched = site.kind in ("attention", "layer")  # attention mixes tokens: keep rows
        # of a sequence together
        if each_own or at_attention:  # per-sequence positions, padded: sequences differ
            seqs = graph.call_function(per_sequence, (
                index, graph.call_method("size", (site.stream, 0)), tokens))
            positions, fill, flat = (graph.call_function(operator.getitem, (seqs, i))
                                     for i in range(3))
        if each_own:
            rows = graph.call_function(select_rows, (site.stream, positions))
            routed = graph.call_function(routed_of, (fill,))
        elif not at_attention:
            rows = graph.call_function(ops.token_gather.default, (x2d, index))
            head = (graph.call_method("size", (site.stream, 0)),) if batched else \
                (1,) * (len(lead) - 1)
            rows = graph.call_method("reshape", (rows, head + (-1, d)))
    if at_attention:  # the fillers' rows are scattered too, with weight 0
        index = flat
        queries_at_attention(graph, site, positions, lead)
    elif compact:  # a decoder's block on its routed tokens alone: they alone write the cache
        compact_branch(graph, site, rows, index, *((positions, fill) if each_own else ()))
    elif site.kind == "attention" and plan.keys == "all":
        queries_only(graph, site, rows, lead)
    else:
        for n in site.branch:
            n.args = fx.node.map_arg(n.args, lambda a: rows if a is site.stream else a)
            n.kwargs = fx.node.map_arg(n.kwargs, lambda a: rows if a is site.stream else a)
            flatten_token_sizes(n, lead, keep_batch=batched)
        if batched and masked(site):  # an encoder's padding mask: the routed tokens' part
            with graph.inserting_before(first):
                positions = graph.call_function(routed_positions, (
                    index, graph.call_method("size", (site.stream, 0)), tokens))
            routed_masks(graph, site, positions)
    if site.kind == "layer":  # the branch ends with the layer's output h: add h - x
        with graph.inserting_before(site.add.next):
            delta = graph.call_function(torch.sub, (site.add, rows))
            upd = graph.call_method("reshape", (delta, (-1, d)))
            if each_own:  # the routed tokens' rows, without the fillers
                upd = graph.call_function(torch.index_select, (upd, 0, routed))
            out = graph.call_function(ops.token_scatter_add.default,
                                      (x2d, index, upd, _gate(graph, plan, scores, index)))
            out = graph.call_method("view_as", (out, site.stream))
        copy_node_meta(out, site.add)
        site.add.replace_all_uses_with(out, delete_user_cb=lambda u: u is not delta)
        return out
    with graph.inserting_before(site.add):
        upd = graph.call_method("reshape", (site.update, (-1, d)))
        if each_own:
            upd = graph.call_function(torch.index_select, (upd, 0, routed))
        gate = _gate(graph, plan, scores, index)
        if at_attention:  # the filler rows add nothing
            gate = fill if gate is None else graph.call_function(torch.mul, (gate, fill))
        out = graph.call_function(ops.token_scatter_add.default, (x2d, index, upd, gate))
        out = graph.call_method("view_as", (out, site.stream))
    copy_node_meta(out, site.add)  # same value as the add had: a later site reads its shape
    site.add.replace_all_uses_with(out)
    graph.erase_node(site.add)
    return out


def _gate(graph: fx.Graph, plan: _Plan, scores: fx.Node, index: fx.Node) -> fx.Node | None:
    """residual_weight="sigmoid": the routed tokens' sigmoid(score), the scatter's weight."""
    if not plan.weighted:
        return None
    flat = graph.call_method("reshape", (scores, (-1,)))
    return graph.call_function(torch.sigmoid, (graph.call_function(
        torch.index_select, (flat, 0, index)),))


def _restream(sites: list[ResidualSite], old: fx.Node, new: fx.Node) -> None:
    """After a rewrite replaced `old` (a routed site's add) by `new`: the sites that read it
    as their stream read `new`."""
    for s in sites:
        if s.stream is old:
            s.stream = new


# Plans chosen by the first graph that held a site, reused by every later graph of the same
# weights, options and calibration: generate()'s decode steps (one token, often no sample
# that fits) then route exactly as the prefill graph measured, with the same thresholds.
_PLANS: dict[tuple, _Plan | None] = {}


def clear_plans() -> None:
    """Forget the routing plans (effc.reset())."""
    _PLANS.clear()


def _plan_key(site: ResidualSite, ctx, cfg: TokenSkipConfig) -> tuple:
    weights = tuple((w, id(ctx.facts.weights[w].value), ctx.facts.weights[w].value._version)
                    for w in site.weights)
    stamp = os.stat(cfg.router).st_mtime_ns if cfg.router != "fit" else 0  # a file's version
    return site.name, weights, repr(cfg), stamp, id(ctx.calibration)


def find_sites(gm: fx.GraphModule, facts: GraphFacts, blocks: tuple[str, ...]
               ) -> list[ResidualSite]:
    """The residual sites of `gm`, with each layer's attention and MLP merged into one
    "layer" site when `blocks` asks for layers."""
    found = residual_sites(gm, facts)
    return found + layer_sites(found) if "layer" in blocks else found


def _update_weight(site: ResidualSite, ctx) -> str:
    """The calibration's key of a residual add: the weight of the branch's last matrix (the
    projection that computes the update, e.g. mlp.down_proj.weight)."""
    matrices = [w for w in site.weights if ctx.facts.weights[w].value.dim() >= 2]
    return (matrices or site.weights)[-1]


def _fails(gm: fx.GraphModule, site: ResidualSite, plan: _Plan, ctx) -> str:
    """Why routing `site` breaks the graph on the inputs of the call being compiled (a view
    the rewrite could not free from the token count, an op that is not per token), or ""."""
    g = copy_graph_module(gm)
    twin = next((s for s in find_sites(g, GraphFacts(g, ctx.example_inputs, root=None),
                                       ctx.current_config.blocks)
                 if s.key == site.key), None)
    if twin is None:
        return "the block is no longer found in the graph"
    args = EndToEnd.example_args(gm, ctx.facts)
    if args is None:
        return "the rewrite could not be checked on the inputs of the call being compiled"
    try:
        route_site(g, twin, plan)
        remove_dead_code(g.graph)
        g.recompile()
        with torch.no_grad():
            g(*ctx.facts.fresh(args))
    except Exception as exc:  # noqa: BLE001 - any failure: the block cannot be routed
        return f"the block does not run on a subset of its tokens: {type(exc).__name__}: " \
               f"{str(exc)[:160]}"
    return ""


class TokenSkipPass(Pass):
    """Mixture-of-Depths routing; see the module docstring."""

    name = "token_skip"
    config_cls = TokenSkipConfig
    rewrites_weights = True  # inference only: routing changes what the graph computes

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        cfg: TokenSkipConfig = self.config
        # what this graph measured, for the rows: site key -> data the router was fitted on,
        # (site key, capacity) -> squared output error with that site alone routed, ARanks
        self.router_data: dict[str, str] = {}
        self.measured: dict[tuple[str, float], float] = {}
        self.aranks: dict[str, float] = {}
        found = self.found = find_sites(gm, ctx.facts, cfg.blocks)
        causal = cfg.routing == "threshold" or (cfg.routing == "auto" and (
            is_causal(gm) or bool(found) and masks_are_causal(gm, ctx)))  # (it runs the graph)
        if not causal and cfg.routing == "auto" and any(  # a decoder's graph without a cache
                p is not None and p.threshold is not None  # (generate(use_cache=False)):
                for p in (_PLANS.get(_plan_key(s, ctx, cfg)) for s in found)):  # as before
            causal = True
        rows, eligible = self._eligible(found, ctx, causal)
        why = {r.site: r.reason for r in rows}
        for site in found:  # (a routed layer's cache, at batch > 1, holds marked keys)
            if site not in eligible and _PLANS.get(_plan_key(site, ctx, cfg)) is not None:
                ctx.warn(f"{site.name} is routed in an earlier graph of this model but not in "
                         f"this one ({why.get(site.name)}): their outputs differ")
        keys = {s.key: _plan_key(s, ctx, cfg) for s in eligible}
        if eligible and all(keys[s.key] in _PLANS for s in eligible):
            for site in eligible:  # decided by an earlier graph of this model
                plan = _PLANS[keys[site.key]]
                rows.append(self._apply(gm, site, plan, ctx, None, None, checked=False)
                            if plan is not None else
                            self._row(site, "skipped", self._kept_reason(site)))
                if plan is not None and rows[-1].decision != "rewritten":
                    ctx.warn(f"{site.name} is routed in an earlier graph of this model but "
                             f"not in this one ({rows[-1].reason}): their outputs differ")
            ctx.note("token_skip: routing reused from the first graph that held these blocks "
                     "(same weights, options and calibration)")
            remove_dead_code(gm.graph)
            return PassResult(rows)
        if not eligible:
            return PassResult(rows)
        e2e = end_to_end(gm, ctx, allocated=True, compensate=False)
        if e2e is None:  # no calibration: the call being compiled is all there is
            e2e = EndToEnd(copy_graph_module(gm), ctx.facts,
                           [EndToEnd.example_call(ctx.facts)])
            e2e.source = "example"
        if not e2e:
            return PassResult(rows + [self._row(s, "skipped", "no inputs to fit the router "
                                                "on (the graph does not run on any)")
                                      for s in eligible])
        routers, oracle = self._fit(e2e, eligible, ctx)
        probe = cfg.capacity if cfg.capacity is not None and 0 < cfg.capacity < 1 else 0.5
        usable = []
        for site in eligible:  # a block that cannot run on routed rows is not measured
            why = (f"{cfg.router} holds no trained router for this site" if site.key not in
                   routers else
                   _fails(gm, site, self._plan(site.key, probe, causal, routers, oracle), ctx))
            if why:
                rows.append(self._row(site, "skipped", why))
            else:
                usable.append(site)
        eligible = usable
        if e2e.source == "samples" and e2e.skipped:
            ctx.note(f"token_skip: {e2e.skipped} calibration sample calls do not run on this "
                     f"graph")
        fitted_here = any(v == "the call being compiled" for v in self.router_data.values())
        if fitted_here or ctx.calibration is None:
            ctx.warn(("routers fitted and " if fitted_here else "") + "effects measured on the "
                     "inputs of the call being compiled (no calibration data for this graph): "
                     "calibrate with effc.calibrate(model, batches, what=('inputs', "
                     "'residuals')), batches shaped like the calls you compile")
        plans = self._choose(gm, e2e, eligible, routers, oracle, causal, ctx)
        for site in eligible:
            plan = plans.get(site.key)
            if plan is not None and plan.capacity >= 1.0:
                plan = None
            _PLANS[keys[site.key]] = plan
            rows.append(self._apply(gm, site, plan, ctx, routers, oracle, checked=True)
                        if plan is not None else
                        self._row(site, "skipped", self._kept_reason(site), routers, oracle))
        remove_dead_code(gm.graph)
        return PassResult(rows)

    def _apply(self, gm, site: ResidualSite, plan: _Plan, ctx, routers, oracle, *,
               checked: bool) -> SiteRow:
        """Route `site` by `plan` (`checked`: it already ran routed on this graph's inputs)."""
        why = (not checked and _fails(gm, site, plan, ctx)) or ctx.claim(site.name)
        if why:
            return self._row(site, "skipped", why)
        _restream(self.found, site.add, route_site(gm, site, plan, ctx, tuple(site.weights)))
        row = self._row(site, "rewritten", self._route_reason(plan), routers, oracle, plan)
        if not plan.info:
            plan.info = {k: v for k, v in row.details.items()
                         if k not in ("kind", "layer", "add_node", "capacity", "threshold",
                                      "routing")}
        return row

    # --- sites ------------------------------------------------------------------------------
    def _eligible(self, found: list[ResidualSite], ctx, causal: bool
                  ) -> tuple[list[SiteRow], list]:
        cfg: TokenSkipConfig = self.config
        layers = [s.layer for s in found if s.layer is not None]
        ends = {min(layers), max(layers)} if layers else set()
        named = set() if cfg.layers == "auto" else set(cfg.layers)
        missing = sorted(named - set(layers))
        if missing:
            ctx.warn(f"layers {missing} match no residual block of this graph (its layers: "
                     f"{sorted(set(layers))})")
        rows, eligible = [], []
        whole = {}  # add node of a part -> the eligible layer site it belongs to
        for s in sorted(found, key=lambda s: s.kind != "layer"):  # layers decide first
            part_of = whole.get(s.add)
            why = (f"part of the routed layer {part_of.name}" if part_of is not None
                   else self._ineligible(s, ctx, causal, named, ends))
            if why:
                rows.append(self._row(s, "skipped", why))
                continue
            eligible.append(s)
            if s.kind == "layer":  # its attention and MLP sites are not routed on their own
                attention_add = next(n for n in s.branch if n.op == "call_function"
                                     and n.target in ADDS and s.stream in n.args)
                whole[attention_add] = whole[s.add] = s
        return rows, eligible

    def _ineligible(self, s: ResidualSite, ctx, causal: bool, named: set, ends: set) -> str:
        """Why site `s` cannot be routed in this graph, or ""."""
        cfg: TokenSkipConfig = self.config
        if s.kind not in cfg.blocks:
            return f"{s.kind} blocks are not among blocks={list(cfg.blocks)}"
        if s.kind == "layer" and causal:  # Mixture-of-Depths proper, as keys="selected"
            why = compact_problem(s, whole_layer=True)
        elif s.kind == "attention" and causal:  # its keys and values feed the cache: allowed
            why = compact_problem(s) if cfg.keys == "selected" else queries_problem(s, "all")
        elif s.kind == "attention" and masked(s) and cfg.keys == "all":  # a padding mask
            why = s.why or queries_problem(s, cfg.keys)
        else:  # (keys="selected" and layers with a padding mask: its routed part, routed_masks)
            why = s.why
        if why:
            return why
        if not ctx.selected(s.name):
            return "excluded by filters"
        if named and s.layer not in named:
            return "not among the layers asked for"
        if not named and s.layer in ends:
            return "the first and last layers are kept unless named in layers"
        return ""

    # --- routers ----------------------------------------------------------------------------
    def _fit(self, e2e: EndToEnd, sites: list[ResidualSite], ctx
             ) -> tuple[dict[str, Router], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per site: the ridge router, and (router scores, true update norms) on the data:
        the calibration's residual rows (calibrate(..., what=("inputs", "residuals"))), else
        the site's values on the graph's sample calls (or the call being compiled)."""
        recorded = {}
        calib = ctx.calibration
        for s in sites:
            r = calib.residuals.get(_update_weight(s, ctx)) if calib is not None and \
                s.kind != "layer" else None  # (a layer's router reads the layer's input)
            if r is not None and r.rows is not None and r.rows.shape[-1] == s.features:
                recorded[s.key] = (r.rows.double(), r.update_norms.double())
        xs = {s.key: [] for s in sites}
        ys = {s.key: [] for s in sites}
        wanted = {n.name for s in sites if s.key not in recorded
                  for n in (s.stream, s.update)}
        for args in (e2e.calls if wanted else []):
            cap = ValueCapture(e2e.gm, wanted)
            with torch.no_grad():
                cap.run(*e2e.facts.fresh(args))
            for s in sites:
                if s.key in recorded:
                    continue
                d = s.features
                x = cap.values[s.stream.name].reshape(-1, d)
                u = cap.values[s.update.name].reshape(-1, d)
                if s.kind == "layer":  # its update node is the layer's output h
                    u = u - x
                xs[s.key].append(x[:MAX_TOKENS].double())
                ys[s.key].append(u[:MAX_TOKENS].double().norm(dim=-1))
        routers, oracle = {}, {}
        trained = load_routers(self.config.router) if self.config.router != "fit" else None
        for s in sites:
            if s.key in recorded:
                x, y = recorded[s.key]
                data = "calibration residual rows"
            else:
                x, y = torch.cat(xs[s.key]), torch.cat(ys[s.key])
                data = ("calibration sample calls" if e2e.source == "samples" else
                        "the call being compiled")
            if trained is None:  # fitted on (and thresholds set from) MAX_TOKENS tokens
                x, y = x[:MAX_TOKENS], y[:MAX_TOKENS]
                r = fit_router(x, y)
            else:
                r, data = trained.get(s.name), f"trained, from {self.config.router}"
                if r is None or r.weight.numel() != s.features:
                    if r is not None:
                        ctx.warn(f"{self.config.router}: the router of {s.name} has "
                                 f"{r.weight.numel()} weights, the block's input {s.features} "
                                 f"features; the block is kept whole")
                    continue
            routers[s.key], oracle[s.key] = r, (r.scores(x), y)
            self.router_data[s.key] = data
        return routers, oracle

    # --- choosing capacities ----------------------------------------------------------------
    def _plan(self, key: str, capacity: float, causal: bool, routers, oracle) -> _Plan:
        thr = threshold(oracle[key][0], capacity) if causal else None
        return _Plan(routers[key], capacity, thr, self.config.keys,
                     self.config.residual_weight == "sigmoid")

    def _graph(self, e2e: EndToEnd, plans: dict[str, _Plan]) -> fx.GraphModule:
        """A copy of the measured graph with `plans` (by add-node name) applied."""
        g = copy_graph_module(e2e.gm)
        facts = GraphFacts(g, [gi.value for gi in e2e.facts.inputs], root=None)
        found = find_sites(g, facts, self.config.blocks)
        for s in found:
            if s.key in plans:
                _restream(found, s.add, route_site(g, s, plans[s.key]))
        remove_dead_code(g.graph)
        g.recompile()
        return g

    def _choose(self, gm, e2e: EndToEnd, sites, routers, oracle, causal, ctx
                ) -> dict[str, _Plan]:
        cfg: TokenSkipConfig = self.config
        plan = lambda s, c: self._plan(s.key, c, causal, routers, oracle)  # noqa: E731
        caps = (cfg.capacity,) if cfg.capacity is not None else CAPACITIES
        calls = max(1, cfg.max_forwards // max(1, len(sites) * len(caps)))
        for s in sites:
            for c in caps:
                if c < 1.0:
                    self.measured[(s.key, c)] = e2e.error2(
                        {}, calls, self._graph(e2e, {s.key: plan(s, c)}))
        if cfg.capacity is not None:
            order = sorted(sites, key=lambda s: self.measured.get((s.key, cfg.capacity), 0))
            if cfg.layer_choice == "arank":
                order = self._by_arank(order, ctx)
            n = len(order) if cfg.max_layers is None or cfg.layers != "auto" else cfg.max_layers
            chosen = {s.key: plan(s, cfg.capacity) for s in order[:n]}
            self._summary(e2e, chosen, ctx, f"capacity {cfg.capacity:g}")
            return chosen
        work = {s.key: 1000 for s in sites}  # per-site token work, in 1/1000 of a site
        options = [SiteOptions(s.key, [Candidate(1.0, 0, 0.0, flops=work[s.key])] + [
            Candidate(c, 0, self.measured[(s.key, c)] ** 0.5, flops=int(c * 1000))
            for c in CAPACITIES]) for s in sites]
        if cfg.budget is not None:
            choice = allocate(options, max_params=cfg.budget * sum(work.values()), cost="flops")
            chosen = {s.key: plan(s, choice[s.key].choice) for s in sites}
            self._summary(e2e, chosen, ctx, f"budget {cfg.budget:g}")
            return chosen
        bound = cfg.min_sqnr_db if cfg.min_sqnr_db is not None else DEFAULT_MIN_SQNR_DB
        target, scale = 10 ** (-bound / 10), 1.0
        for _ in range(MAX_CHECKS):
            choice = allocate(options, max_error2=target * scale, cost="flops")
            chosen = {s.key: plan(s, choice[s.key].choice) for s in sites}
            got = self._measure(e2e, chosen)
            if got <= target:
                break
            scale *= 0.5
        else:
            chosen, got = {}, 0.0
        self._summary(e2e, chosen, ctx, f"min_sqnr_db {bound:g}"
                      + (" (the quality-bounded default)" if cfg.min_sqnr_db is None else ""),
                      got)
        return chosen

    def _by_arank(self, sites: list[ResidualSite], ctx) -> list[ResidualSite]:
        """`sites` by their layer's ARank (lowest first) from the calibration's attention
        maps; unchanged, with a warning, where the maps are missing."""
        maps: dict[int, list] = {}
        for name, kept in (ctx.calibration.attention.items() if ctx.calibration else ()):
            if layer_index(name) is not None:
                maps.setdefault(layer_index(name), []).extend(kept)
        self.aranks.update({s.key: arank(maps[s.layer]) for s in sites if s.layer in maps})
        if len(self.aranks) < len(sites):
            ctx.warn("layer_choice='arank' needs attention maps of every routed layer: "
                     "calibrate with effc.calibrate(model, batches, what=('inputs', "
                     "'attention')); the layers are chosen by measured error instead")
            return sites
        return sorted(sites, key=lambda s: self.aranks[s.key])

    def _measure(self, e2e: EndToEnd, chosen: dict[str, _Plan]) -> float:
        live = {k: p for k, p in chosen.items() if p.capacity < 1.0}
        return e2e.error2({}, None, self._graph(e2e, live)) if live else 0.0

    def _summary(self, e2e: EndToEnd, chosen: dict[str, _Plan], ctx, rule: str,
                 err2: float | None = None) -> None:
        """The graph's note; `err2`: the choice's output error if already measured."""
        live = {k: p for k, p in chosen.items() if p.capacity < 1.0}
        err2 = self._measure(e2e, live) if err2 is None else err2
        where = (f"{len(e2e.calls)} calibration sample calls" if e2e.source == "samples"
                 else "the inputs of the call being compiled")
        ctx.note(f"token_skip {rule}: {len(live)} blocks routed; graph main output SQNR "
                 f"{db(err2):.1f} dB on {where} ({e2e.forwards} forward passes)")

    # --- report -----------------------------------------------------------------------------
    def _kept_reason(self, site: ResidualSite) -> str:
        cfg: TokenSkipConfig = self.config
        if cfg.capacity is not None and cfg.capacity >= 1.0:
            return "capacity 1: every token goes through the block (nothing to rewrite)"
        if cfg.capacity is not None:
            return f"kept whole: max_layers={cfg.max_layers} took less sensitive blocks"
        return "kept whole by the allocator (skipping any of its tokens cost more output error)"

    @staticmethod
    def _route_reason(plan: _Plan) -> str:
        if plan.capacity <= 0.0:
            return "block dropped (capacity 0): every token keeps its input"
        how = ("per-token threshold (causal)" if plan.threshold is not None
               else "top-k per sequence")
        router = ("trained router" if math.isnan(plan.router.r2)
                  else "ridge router on the update norm")
        gate = ", updates scaled by sigmoid(score)" if plan.weighted else ""
        return f"capacity {plan.capacity:g}, {how}, {router}{gate}"

    def _row(self, site: ResidualSite, decision: str, reason: str, routers=None, oracle=None,
             plan: _Plan | None = None) -> SiteRow:
        details: dict[str, Any] = {"kind": site.kind, "layer": site.layer,
                                   "add_node": site.add.name}
        error: dict[str, float] = {}
        key = site.key
        if plan is not None and plan.info and not oracle:  # decided by an earlier graph
            return SiteRow(self.name, site.name, decision, reason, details={
                **details, "capacity": plan.capacity, "threshold": plan.threshold,
                "routing": "top_k" if plan.threshold is None else "threshold", **plan.info})
        r = plan.router if plan is not None else (routers or {}).get(key)
        if r is not None:
            if not math.isnan(r.r2):  # a fitted router (a trained one has no fit to report)
                details.update(router_r2=round(r.r2, 4), router_tokens=r.tokens)
            if key in self.router_data:
                details["router_data"] = self.router_data[key]
        if plan is not None:
            details.update(capacity=plan.capacity, routing="top_k" if plan.threshold is None
                           else "threshold", threshold=plan.threshold)
        if plan is not None and oracle and key in oracle:
            scores, norms = oracle[key]
            details["oracle_overlap"] = round(overlap(scores, norms, plan.capacity), 4)
            if plan.threshold is not None:
                details["kept_fraction"] = round(
                    float((scores >= plan.threshold).double().mean()), 4)
        if key in self.aranks:
            details["arank"] = round(self.aranks[key], 4)
        probe = plan.capacity if plan is not None else self.config.capacity
        m = self.measured.get((key, probe))
        if m is not None:  # the graph's output with this block alone routed at `probe`
            error["graph_sqnr_db_alone"] = round(db(m), 2)
        return SiteRow(self.name, site.name, decision, reason, details=details, error=error)

