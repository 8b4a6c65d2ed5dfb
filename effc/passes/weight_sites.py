"""The weight sites every weight pass rewrites (low_rank, hypercomplex, shift_add): one finder.

Sites: `linear(x, W, b)`; `addmm(b, x, W)` and `matmul(x, W)` with a 2-D parameter W stored
[in, out] (Hugging Face GPT-2's Conv1D); `x @ W.T` (Falcon's FalconLinear); `conv1d`/`conv2d`
with a parameter weight and groups == 1. Each site exposes its weight as an [m, n] (out x in)
matrix whatever the layout, so a pass's math never sees the call's form.

BatchNorm folding: on inference graphs a `batch_norm(y, mean, var, gamma, beta, False, ...)`
that is the only user of a conv (or a 2-D linear) output is folded into the site exactly:
M' = diag(s) M and b' = s (b - mean) + beta with s = gamma / sqrt(var + eps). The pass then
approximates M', the matrix the layer really applies (factorizing M before a BatchNorm that
rescales its rows weighs the rows wrongly), and the rewritten op replaces both calls. The
folded tensors are derived from the weight and the BatchNorm's tensors, so all of them are
claimed and watched by the stale-weight guard (`Site.sources`).

Computed weights (`find_site(..., computed=True)`): a linear/conv whose weight is computed in
the graph from weights alone (a PHM layer's Kronecker sum, however it is written) is a site
too. The computation is evaluated once at compile time; the site is named after the weights
it reads (`layers.0.<a,s>`), and all of them are its sources.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from effc.compiler.graph_facts import is_transpose, node_arg, node_shape, run_node

LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
CONVS = (torch.conv2d, torch.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv1d)
BATCH_NORMS = (torch.nn.functional.batch_norm, torch.batch_norm)
MAX_COMPUTED_NODES = 256  # a weight computation larger than this is not evaluated
# a computed weight has an exact structure (a rank, a Kronecker rank) if what the structure
# leaves out is below this, relative: float32 rounding of a sum of products leaves ~1e-7
STRUCTURE_TOL = 1e-5


@dataclasses.dataclass
class BatchNormFold:
    """The BatchNorm folded into a site: its node, per-channel scale and shift, tensor names."""

    node: fx.Node
    scale: torch.Tensor      # [m] float64: gamma / sqrt(var + eps)
    shift: torch.Tensor      # [m] float64: beta - mean * scale
    names: list[str]         # running_mean, running_var, gamma, beta (those that are weights)


@dataclasses.dataclass
class Site:
    """A weight call: the node, its weight as an [m, n] (out x in) matrix, and how to rebuild."""

    node: fx.Node
    kind: str                  # "linear" | "addmm" | "matmul" | "matmul_t" | "conv"
    weight_name: str
    weight: torch.Tensor       # the parameter as stored
    matrix: torch.Tensor       # [m, n] out x in view of the weight (BatchNorm folded in)
    conv_args: tuple = ()      # stride, padding, dilation
    view: fx.Node | None = None  # matmul_t: the `W.T` node between the weight and the matmul
    bn: BatchNormFold | None = None
    bias_name: str | None = None  # the call's bias, when it is a weight (folded with the BN)
    computed: list[str] = dataclasses.field(default_factory=list)  # the weights W is computed from
    weight_arg: fx.Node | None = None  # computed: the node that holds W

    def operands(self) -> tuple[fx.Node, Any]:
        """(x, bias) read from the node now: earlier rewrites may have replaced x's producer."""
        args, kw = self.node.args, self.node.kwargs
        if self.kind == "addmm":
            return args[1], args[0]
        if self.kind in ("matmul", "matmul_t"):
            return args[0], None
        return args[0], args[2] if len(args) > 2 else kw.get("bias")

    @property
    def output(self) -> fx.Node:
        """The node whose value the rewritten op replaces (the BatchNorm when folded)."""
        return self.bn.node if self.bn is not None else self.node

    @property
    def sources(self) -> list[str]:
        """Every weight the rewrite is derived from (claimed, and watched for staleness)."""
        if self.computed:
            return list(self.computed)
        extra = ([self.bias_name] if self.bias_name and self.bn is not None else [])
        return [self.weight_name, *extra, *(self.bn.names if self.bn is not None else [])]

    @property
    def m(self) -> int:
        return self.matrix.shape[0]

    @property
    def n(self) -> int:
        return self.matrix.shape[1]

    def folded_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias of the folded layer (float64): s (b - mean) + beta, or `bias` unfolded."""
        if self.bn is None:
            return bias
        b = torch.zeros(self.m, dtype=torch.float64) if bias is None else bias.double().cpu()
        return (self.bn.scale * b + self.bn.shift).to(self.weight.device)

    def weight_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """The stored weight (layout, dtype) whose call computes `matrix` (an approximation of
        `self.matrix`), BatchNorm unfolded: what to feed the original graph to measure it."""
        mat = matrix.double().to(self.weight.device)
        if self.bn is not None:
            scale = self.bn.scale.to(mat.device)
            mat = torch.where(scale[:, None] != 0, mat / scale[:, None], torch.zeros_like(mat))
        if self.kind in ("addmm", "matmul"):
            mat = mat.T
        return mat.reshape(self.weight.shape).to(self.weight.dtype).contiguous()


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


def computed_weight(w_node: Any, facts) -> tuple[str, torch.Tensor, list[str]] | None:
    """(name, value, source weights) of a weight computed in the graph from weights (and
    constants) alone, evaluated now; None if it reads an input or is not computed."""
    if not isinstance(w_node, fx.Node) or w_node.op == "placeholder":
        return None
    order, seen, stack = [], {w_node}, [w_node]
    sources: list[fx.Node] = []
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            if facts.weight_name(n) is None:
                return None
            sources.append(n)
            continue
        if n.op not in ("call_function", "call_method", "get_attr") or len(seen) > MAX_COMPUTED_NODES:
            return None
        order.append(n)
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    if not sources:
        return None
    env = {n: facts.weight_value(n) for n in sources}
    position = {n: i for i, n in enumerate(w_node.graph.nodes)}
    try:
        with torch.no_grad():
            for n in sorted(order, key=position.__getitem__):
                env[n] = run_node(w_node.graph.owning_module, n, env)
    except Exception:  # noqa: BLE001 - a computation that does not run here is no site
        return None
    value = env[w_node]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    names = sorted(facts.weight_name(n) for n in sources)
    prefix = ".".join(names[0].split(".")[:-1])
    for other in names[1:]:
        while prefix and not other.startswith(prefix + "."):
            prefix = ".".join(prefix.split(".")[:-1])
    leaves = [x[len(prefix) + 1:] if prefix else x for x in names]
    label = f"<{','.join(leaves)}>"
    return (f"{prefix}.{label}" if prefix else label), value.detach(), names


def _computed_site(node: fx.Node, kind: str, w_node: Any, facts) -> Site | str | None:
    found = computed_weight(w_node, facts)
    if found is None:
        return None
    name, w, names = found
    if kind == "linear":
        site = Site(node, "linear", name, w, w) if w.dim() == 2 else None
    else:
        site = _conv_site(node, name, w)
        if isinstance(site, str):
            return f"{name}: {site}"
    if site is not None:
        site.computed, site.weight_arg = names, w_node
    return site


def find_site(node: fx.Node, facts, computed: bool = False) -> Site | str | None:
    """The Site at `node`, "weight: reason" if it is a site no pass can take, or None.
    `computed`: also weights computed in the graph from weights alone."""
    if node.op != "call_function":
        return None
    t = node.target
    if t in LINEARS:
        w_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        name = facts.weight_name(w_node)
        if name is None:
            return _computed_site(node, "linear", w_node, facts) if computed else None
        w = facts.weight_value(w_node)
        return Site(node, "linear", name, w, w) if w.dim() == 2 else None
    if t is torch.addmm and len(node.args) == 3:
        name = facts.weight_name(node.args[2])
        if name is None:
            return None
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return f"{name}: addmm with alpha/beta != 1"
        w = facts.weight_value(node.args[2])
        return Site(node, "addmm", name, w, w.T)
    if t in (torch.matmul, operator.matmul) and len(node.args) == 2:
        view = node.args[1] if is_transpose(node.args[1]) else None
        w_node = view.args[0] if view is not None else node.args[1]
        name = facts.weight_name(w_node)
        w = facts.weight_value(w_node)
        if name is None or w.dim() != 2:
            return None
        if view is not None:  # x @ W.T is linear(x, W)
            return Site(node, "matmul_t", name, w, w, view=view)
        return Site(node, "matmul", name, w, w.T)
    if t in CONVS:
        name = facts.weight_name(node.args[1])
        if name is None:
            return _computed_site(node, "conv", node.args[1], facts) if computed else None
        site = _conv_site(node, name, facts.weight_value(node.args[1]))
        return site if isinstance(site, Site) else f"{name}: {site}"
    return None


def fold_batch_norm(site: Site, facts) -> str:
    """Fold the eval-mode BatchNorm that alone reads the site's output into it; "" if folded
    or there is none, else why a BatchNorm that follows could not be folded."""
    users = list(site.node.users)
    if len(users) != 1 or users[0].op != "call_function" or users[0].target not in BATCH_NORMS:
        return ""
    bn = users[0]
    if bn.target is torch.batch_norm:  # aten form: (x, weight, bias, mean, var, training, ...)
        gamma, beta, mean, var = (node_arg(bn, i, k) for i, k in
                                  ((1, "weight"), (2, "bias"), (3, "running_mean"),
                                   (4, "running_var")))
        training, eps = node_arg(bn, 5, "training", False), node_arg(bn, 7, "eps", 1e-5)
    else:
        mean, var, gamma, beta = (node_arg(bn, i, k) for i, k in
                                  ((1, "running_mean"), (2, "running_var"), (3, "weight"),
                                   (4, "bias")))
        training, eps = node_arg(bn, 5, "training", False), node_arg(bn, 7, "eps", 1e-5)
    if bn.args[0] is not site.node or training is not False or not isinstance(eps, float):
        return "the BatchNorm after it is in training mode (not folded)"
    shape = node_shape(site.node) or ()
    if site.kind != "conv" and len(shape) != 2:
        return "a BatchNorm over a linear output that is not 2-D (not folded)"
    _, bias = site.operands()
    if isinstance(bias, fx.Node) and facts.weight_name(bias) is None:
        return "the call's bias is computed in the graph (BatchNorm not folded)"
    values, names = [], []
    for t in (mean, var, gamma, beta):
        if t is None:
            values.append(None)
            continue
        name = facts.weight_name(t)
        if name is None:
            return "the BatchNorm's statistics are not weights of the graph (not folded)"
        names.append(name)
        values.append(facts.weight_value(t).detach().double().cpu())
    mean_v, var_v, gamma_v, beta_v = values
    if mean_v is None or var_v is None:
        return "the BatchNorm has no running statistics (not folded)"
    scale = (gamma_v if gamma_v is not None else torch.ones_like(var_v)) / (var_v + eps).sqrt()
    shift = (beta_v if beta_v is not None else torch.zeros_like(mean_v)) - mean_v * scale
    site.bn = BatchNormFold(bn, scale, shift, names)
    site.matrix = site.matrix.double() * scale.to(site.matrix.device)[:, None]
    site.bias_name = facts.weight_name(bias) if isinstance(bias, fx.Node) else None
    return ""


def find_sites(gm: fx.GraphModule, facts, fold_bn: bool = True, computed: bool = False
               ) -> Iterator[Site | str]:
    """Every site of the graph in order (a Site, or "weight: reason" for one no pass can take),
    with BatchNorms folded where `fold_bn` (inference graphs; not into computed weights,
    whose structure a row scaling would break)."""
    for node in list(gm.graph.nodes):
        site = find_site(node, facts, computed)
        if isinstance(site, Site) and fold_bn and not site.computed:
            fold_batch_norm(site, facts)
        if site is not None:
            yield site


def site_rows(site: Site) -> int:
    """Rows the example input pushes through the site (output positions), hints for SymInts."""
    shape = node_shape(site.node) or ()
    sizes = [int(s.node.hint) if isinstance(s, torch.SymInt) and s.node.hint is not None
             else (s if isinstance(s, int) else 1) for s in shape]
    if site.kind == "conv":
        return math.prod(sizes) // max(sizes[-site.weight.dim() + 1], 1) if sizes else 1
    return math.prod(sizes[:-1]) if sizes else 1


def weight_node(site: Site, facts) -> fx.Node:
    """The placeholder of the site's weight (the node that computes it, for computed ones)."""
    if site.weight_arg is not None:
        return site.weight_arg
    if site.view is not None:
        return site.view.args[0]
    return next(a for a in site.node.all_input_nodes if facts.weight_name(a) == site.weight_name)


def replace_site(gm: fx.GraphModule, site: Site, new: fx.Node) -> None:
    """Make `new` (inserted before the site's node) replace the site's output and drop the
    call, its BatchNorm and a `W.T` view (or the weight's computation) that nothing else
    reads."""
    out = site.output
    out.replace_all_uses_with(new)
    if site.bn is not None:
        gm.graph.erase_node(site.bn.node)
    gm.graph.erase_node(site.node)
    if site.view is not None and not site.view.users:
        gm.graph.erase_node(site.view)
    dead = [site.weight_arg] if site.weight_arg is not None else []
    while dead:  # the computation of W, up to the weights it reads
        n = dead.pop()
        if n.users or n.op == "placeholder" or n.graph is not gm.graph:
            continue
        inputs = n.all_input_nodes
        gm.graph.erase_node(n)
        dead.extend(inputs)


def skip_reason(site: Site, ctx, conv: bool) -> str:
    """Why no weight pass may rewrite `site` ("" if one may): the include/exclude filters,
    conv sites turned off (`conv`), or a weight other calls read too."""
    if not ctx.selected(site.weight_name):
        return "excluded by include/exclude filters"
    if site.kind == "conv" and not conv:
        return "conv sites are off (conv=False)"
    return tied_uses(site, ctx.facts)


def tied_uses(site: Site, facts) -> str:
    """Why the site's weight cannot be rewritten for this call alone ("" if it can): other
    calls read the same weight (tied embeddings and heads)."""
    for n in (weight_node(site, facts), site.view):
        calls = [u for u in n.users if u.op != "output"] if n is not None else []
        if len(calls) > 1:
            return f"weight is used by {len(calls)} calls (tied weights)"
    return ""


def still_built(site: Site) -> str:
    """For a computed weight the graph also returns (a module that stores it as an attribute
    in forward, `self.weight = ...`): a note that it is still computed at run time."""
    if site.weight_arg is not None and any(u.op == "output" for u in site.weight_arg.users):
        return ("; the graph also returns W (the model stores it, e.g. self.weight = ... in "
                "forward), so W is still computed at run time for that")
    return ""


def site_bias(gm: fx.GraphModule, ctx, site: Site, name_hint: str) -> Any:
    """The bias argument of the op replacing `site`: the call's own, or with a BatchNorm
    folded in, the folded bias as a constant derived from the site's sources."""
    _, bias = site.operands()
    if site.bn is None:
        return bias
    value = ctx.facts.weight_value(bias) if isinstance(bias, fx.Node) else None
    folded = site.folded_bias(value).to(device=site.weight.device, dtype=site.weight.dtype)
    return ctx.add_constant(gm, folded.contiguous(), derived_from=site.sources,
                            name_hint=name_hint)
