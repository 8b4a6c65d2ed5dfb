"""kv_proj: attention over a projected KV cache, run in the projected dimensions.

`effc.kv_cache(...)` (effc/projected_cache.py) stores K P_k and V P_v and hands attention the
rebuilt K P_k P_k^T and V P_v P_v^T: that saves memory, but every decode step rebuilds the
whole cache at full width. This pass finds that rebuild where it feeds
scaled_dot_product_attention and moves the projections to the single query and output row:

    softmax(s q (L_k P_k^T)^T) (L_v P_v^T) = softmax(s (q P_k) L_k^T) L_v  P_v^T

(per query head, with its KV head's bases; the scale s stays the original 1/sqrt(head_dim)).
Exact algebra; the attention then reads the r-wide cache directly. The rebuild nodes become
dead and are removed. Graphs without a projected cache are left as they are (the report says
so); the compression itself, and its knobs, belong to effc.kv_cache.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from effc.compiler.config import PassConfig, knob
from effc.compiler.graph_facts import node_arg
from effc.compiler.report import SiteRow
from effc.passes.base import Pass, PassResult

SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
MATMULS = (torch.matmul, operator.matmul)
_BASIS = re.compile(r"layers_(\d+)_(key|value)_basis")
COMPRESSION_KNOBS = ("ratio", "budget", "min_energy", "keys", "values", "multiple", "bases")


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
    keys: Literal["auto", "pca", "pairs", "none"] = knob(
        "auto", "pca: a PCA basis of the keys the cache stores (after RoPE); pairs: whole "
                "RoPE planes (commutes with the rotation, so it could fold into W_q/W_k; "
                "measured worse); none: keys kept whole; auto: pca")
    values: bool = knob(True, "project the values too")
    bases: Literal["auto", "calibration", "weights"] = knob(
        "auto", "calibration: PCA of the recorded per-head K/V moments; weights: data-free, "
                "from W_k/W_v (and the recorded input moments where present; RoPE averaged "
                "over positions); auto: calibration when it holds K/V moments")
    multiple: int = knob(2, "ranks are multiples of this (pairs: of 2)", min=1)

    def validate(self, key: str) -> None:
        if self.ratio is not None and self.budget is not None:
            raise ValueError(f"effc option {key!r}: give one of ratio, budget; got both")



def _basis_of(node) -> tuple[fx.Node, str] | None:
    """(basis placeholder, its layer index) if `node` is `basis` or `basis.to(...)`."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to":
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "placeholder":
        found = _BASIS.search(node.name)
        if found:
            return node, found.group(1)
    return None


def rebuild(node) -> tuple[fx.Node, fx.Node, str] | None:
    """(latent cache L, basis P, layer) if `node` is `L @ P^T`, a projected cache's rebuild."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in MATMULS):
        return None
    lat, t = node.args[0], node.args[1]
    if not (isinstance(t, fx.Node) and t.op == "call_method" and t.target == "transpose"
            and set(t.args[1:]) == {-1, -2}):
        return None
    basis = _basis_of(t.args[0])
    return (lat, t.args[0], basis[1]) if basis is not None else None


class KVProjPass(Pass):
    """Attention in the projected dimensions of an effc.kv_cache; see the module docstring."""

    name = "kv_proj"
    config_cls = KVProjConfig

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        cfg: KVProjConfig = self.config
        given = [k for k in COMPRESSION_KNOBS
                 if getattr(cfg, k) != KVProjConfig.__dataclass_fields__[k].default]
        if given:
            ctx.warn(f"the knobs {', '.join(given)} choose effc.kv_cache's projections; as a "
                     f"compile option kv_proj only runs attention in the dimensions of the "
                     f"cache it is given (build it with effc.kv_cache(model, calibration, ...))")
        rows = []
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in SDPA:
                continue
            keys, values = rebuild(node.args[1]), rebuild(node.args[2])
            layer = (keys or values or (None, None, None))[2]
            site = f"cache.layers.{layer}" if layer is not None else f"attention:{node.name}"
            why = ("no projected cache rebuild feeds this attention (pass the model an "
                   "effc.kv_cache)" if keys is None and values is None else
                   "excluded by filters" if not ctx.selected(site) else
                   "dropout in attention" if node_arg(node, 4, "dropout_p", 0.0) else "")
            if why:
                rows.append(SiteRow(self.name, site, "skipped", why))
                continue
            rows.append(self._fold(graph, node, keys, values, site))
        if rows:
            graph.eliminate_dead_code()
        return PassResult(rows)

    def _fold(self, graph: fx.Graph, node: fx.Node, keys, values, site: str) -> SiteRow:
        q = node.args[0]
        scale = node_arg(node, 6, "scale")
        if scale is None:
            scale = float(q.meta["example_value"].shape[-1]) ** -0.5
        heads = q.meta["example_value"].shape[1]

        def per_head(basis: fx.Node) -> fx.Node:
            """[G, d, r] -> [H, d, r]: each query head reads its KV head's basis."""
            groups = basis.meta["example_value"].shape[0]
            if groups == heads:
                return basis
            return graph.call_function(torch.repeat_interleave, (basis,),
                                       {"repeats": heads // groups, "dim": 0})

        with graph.inserting_before(node):
            if keys is not None:
                q = graph.call_function(torch.matmul, (q, per_head(keys[1])))
            args = (q, keys[0] if keys is not None else node.args[1],
                    values[0] if values is not None else node.args[2]) + tuple(node.args[3:])
            kwargs = {**node.kwargs, "scale": scale}
            new = out = graph.call_function(node.target, args, kwargs)
            if values is not None:
                up = graph.call_method("transpose", (per_head(values[1]), -1, -2))
                out = graph.call_function(torch.matmul, (new, up))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        what = " and ".join(w for w, f in (("keys", keys), ("values", values)) if f is not None)
        return SiteRow(self.name, site, "rewritten",
                       f"attention reads the projected {what} directly (queries times P_k, "
                       f"output times P_v^T) instead of rebuilding them to full width",
                       details={"keys": keys is not None, "values": values is not None})
