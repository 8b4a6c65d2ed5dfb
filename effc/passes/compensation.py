"""Error-compensating fits: each site is fitted on the inputs it will really see.

An independent fit approximates a layer on its original inputs x. Once the layers before it
are rewritten, it sees x^ instead. Fitting it to map x^ to the original layer's output M x
lets it absorb part of the earlier error (as GPTQ-style sequential calibration does).
Closed form: the best unconstrained map is A* = M C_xh C_hh^-1 (C_xh = sum x x^^T,
C_hh = sum x^ x^^T over the calibration rows), and for a rank-constrained A,
||M X - A X^||^2 = const + ||(A* - A) L^||^2 with C_hh = L^ L^^T, so the pass factorizes A*
whitened by C_hh: the same truncation as its independent fit, on other matrices.

`sequential_fit` runs the graph twice in lockstep over the calibration's sample inputs, node
by node: as traced (x), and with every already-refitted site replaced (x^). At each site it
accumulates the two moments, asks the pass for the site's new approximation, and continues
the rewritten run with it. One pass over the samples; memory: the live activations of both
runs. A site whose rows are too few for its input width keeps its independent fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx as fx

from effc.compiler.calibration.observer import patch_rows
from effc.compiler.graph_facts import run_node
from effc.passes.budget import EndToEnd
from effc.passes.weight_sites import Site, weight_node

MIN_ROWS_PER_FEATURE = 4  # fewer rows than this per input feature: C_hh is too poorly known
RIDGE = 1e-4              # relative to the mean diagonal of C_hh: keeps the solve stable


def _rows(site: Site, x: torch.Tensor) -> torch.Tensor:
    """The site's input rows [N, n] in the order of site.matrix's columns (float64)."""
    if site.kind == "conv":
        return torch.cat([r.double() for r in patch_rows(x, site.weight, *site.conv_args)])
    return x.reshape(-1, site.n).double()


def compensated_target(matrix: torch.Tensor, c_hh: torch.Tensor, c_xh: torch.Tensor
                       ) -> torch.Tensor:
    """A* = M C_xh C_hh^-1 (float64), with a small ridge on C_hh."""
    m = matrix.double()
    c = c_hh + RIDGE * c_hh.diagonal().mean().clamp_min(1e-30) * torch.eye(
        c_hh.shape[0], dtype=c_hh.dtype, device=c_hh.device)
    L = torch.linalg.cholesky(c)
    return torch.cholesky_solve((m @ c_xh).T, L).T


def sequential_fit(gm: fx.GraphModule, e2e: EndToEnd, sites: Sequence[Site],
                   refit: Callable[[Site, torch.Tensor | None, torch.Tensor | None, int],
                                   torch.Tensor]) -> None:
    """Walk the graph over the samples; at each site call refit(site, C_hh, C_xh, rows).

    `refit` returns the [m, n] approximation of `site.matrix` the rewritten run continues
    with: its compensated fit, or its independent one when C_hh is None (fewer than
    MIN_ROWS_PER_FEATURE rows per input feature: too few to fit on).
    """
    by_node = {s.node: s for s in sites}
    nodes = list(gm.graph.nodes)
    last_use = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    placeholders = [n for n in nodes if n.op == "placeholder"]

    def fresh(args):
        return dict(zip(placeholders, e2e.facts.fresh(args)))

    runs = [(fresh(args), fresh(args)) for args in e2e.calls]  # (as traced, rewritten)
    with torch.no_grad():
        for i, node in enumerate(nodes):
            if node.op in ("placeholder", "output"):
                continue
            swap = None
            site = by_node.get(node)
            if site is not None:
                x_node = site.operands()[0]
                c_hh = c_xh = None
                rows = 0
                for orig, new in runs:
                    x, xh = _rows(site, orig[x_node]), _rows(site, new[x_node])
                    c_hh = xh.T @ xh if c_hh is None else c_hh + xh.T @ xh
                    c_xh = x.T @ xh if c_xh is None else c_xh + x.T @ xh
                    rows += x.shape[0]
                if rows < MIN_ROWS_PER_FEATURE * site.n:
                    c_hh = c_xh = None
                weight = site.weight_from_matrix(refit(site, c_hh, c_xh, rows))
                if site.view is not None:  # x @ W.T: the view was computed already
                    swap = {site.view: weight.T}
                else:
                    swap = {weight_node(site, e2e.facts): weight}
            for orig, new in runs:
                orig[node] = run_node(gm, node, orig)
                new[node] = run_node(gm, node, new, swap)
            for a in node.all_input_nodes:  # free what no later node reads
                if last_use.get(a) == i and a.op != "placeholder":
                    for orig, new in runs:
                        orig.pop(a, None)
                        new.pop(a, None)
