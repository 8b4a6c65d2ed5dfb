"""shift_add's opt-in binary attention: scaled_dot_product_attention -> effc.binary_attention.

Queries and keys become b-bit codes sign(x P) and their similarity a Hamming count
(effc/kernels/binary_attention.py). P is a seeded random Gaussian projection: fitting it on
calibration queries and keys is not implemented. Without training this loses much of what
softmax attention computes, so the rewrite is opt-in (`attention="binary"`) and its effect on
the graph's main output, measured on the inputs of the call being compiled, is in every row
and in a note. Sites with an attention mask or dropout are skipped with the reason.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

import effc.kernels.binary_attention  # noqa: F401  (registers torch.ops.effc.binary_attention)
from effc.compiler.graph_facts import copy_graph_module, copy_node_meta, node_arg, node_shape
from effc.compiler.metrics import error_stats
from effc.compiler.report import SiteRow

SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
SEED = 0


def _main_output(gm: fx.GraphModule, args: list) -> torch.Tensor | None:
    with torch.no_grad():
        leaves = [t for t in pytree.tree_leaves(gm(*args))
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return max(leaves, key=lambda t: t.numel()) if leaves else None


def binary_attention_sites(gm: fx.GraphModule, ctx, pass_name: str, bits: int) -> list[SiteRow]:
    """Rewrite every SDPA call without mask or dropout; a row per call, with the measured
    end-to-end error of all of them together."""
    before = copy_graph_module(gm)
    rows, done = [], []
    generator = torch.Generator().manual_seed(SEED)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA:
            continue
        name = f"attention:{node.name}"
        q, k, v = node.args[:3]
        mask, dropout = node_arg(node, 3, "attn_mask"), node_arg(node, 4, "dropout_p", 0.0)
        causal = node_arg(node, 5, "is_causal", False)
        shape = node_shape(q)
        why = ("an attention mask (padding or a custom mask) is not supported by the binary "
               "form" if mask is not None else
               "attention dropout is on" if dropout else
               "the query's head size is not known" if not shape or not isinstance(shape[-1], int)
               else "")
        if why or not ctx.selected(name):
            rows.append(SiteRow(pass_name, name, "skipped", why or "excluded by filters"))
            continue
        proj = torch.randn(shape[-1], bits, generator=generator, dtype=torch.float32)
        proj_node = ctx.add_constant(gm, proj.to(ctx.device), derived_from=[],
                                     name_hint=f"{node.name}.binary_proj")
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.effc.binary_attention.default,
                                         (q, k, v, proj_node, bool(causal)))
        copy_node_meta(new, node)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done.append(SiteRow(pass_name, name, "rewritten",
                            f"binary codes of {bits} bits (random projection, not fitted), "
                            f"Hamming similarity{', causal' if causal else ''}",
                            details={"kind": "attention", "bits": bits, "causal": bool(causal)}))
    if done:
        gm.recompile()
        args = ctx.facts.fresh()
        ref, out = _main_output(before, args), _main_output(gm, ctx.facts.fresh())
        stats = error_stats(ref, out) if ref is not None and out is not None else {}
        for row in done:
            row.error = {"graph_" + k: v for k, v in stats.items()}
        if stats:
            ctx.note(f"{pass_name}: binary attention at {len(done)} sites: the graph's main "
                     f"output on the inputs of the call being compiled keeps cosine "
                     f"{stats['cosine']:.3f}, SQNR {stats['sqnr_db']:.1f} dB (training-free)")
    return rows + done
