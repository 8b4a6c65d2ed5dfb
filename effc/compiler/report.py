"""The report: what every pass did to every site, per compiled graph.

Passes fill `SiteRow`s; the pass manager wraps them in a `PassRecord` (status, timing) per
pass and a `GraphReport` per compiled graph. `Report` collects graphs, sums counters and
renders as a plain-text table (`print(report)`), Markdown and JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal

Decision = Literal["rewritten", "skipped"]


@dataclasses.dataclass
class SiteRow:
    """One site a pass looked at, and what it decided."""

    pass_name: str
    site: str
    decision: Decision
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    error: dict[str, float] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassRecord:
    """One pass on one graph: ran / rolled back / skipped, how long, and its sites."""

    name: str
    status: Literal["ran", "rolled back", "skipped"] = "ran"
    reason: str = ""
    seconds: float = 0.0
    sites: list[SiteRow] = dataclasses.field(default_factory=list)

    @property
    def counters(self) -> dict[str, int]:
        rewritten = sum(s.decision == "rewritten" for s in self.sites)
        return {"seen": len(self.sites), "rewritten": rewritten,
                "skipped": len(self.sites) - rewritten}


@dataclasses.dataclass
class KernelRecord:
    """One group the Triton lowering replaced by a generated kernel."""

    name: str             # the kernel's name: what it computes (fused_mul_add_gelu, row_rmsnorm)
    kind: str             # "pointwise" | "row" | "gemm"
    nodes: list[str]      # the FX nodes it computes
    outputs: list[str]    # those it writes to memory (used outside the group or returned)
    file: str             # kernels/<file> in the debug dir
    source_hash: str


@dataclasses.dataclass
class FallbackRecord:
    """A group (or a whole graph) the Triton lowering left to eager, and why."""

    nodes: list[str]
    reason: str
    kernel: str = ""      # set when a generated kernel fell back at run time


@dataclasses.dataclass
class GraphReport:
    """Everything effc did to one graph Dynamo handed it."""

    graph: str
    inputs: dict[str, int] = dataclasses.field(default_factory=dict)
    grad_enabled: bool = False
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    lowering: str = ""
    verify: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    compile_seconds: float = 0.0
    rederivations: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)  # also logged on "effc"
    kernels: list[KernelRecord] = dataclasses.field(default_factory=list)
    fallbacks: list[FallbackRecord] = dataclasses.field(default_factory=list)
    # lowering="triton": the calls left to eager, by kind ("library", "views", "non-float",
    # "other") and op name, with counts
    eager_ops: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def sites(self) -> list[SiteRow]:
        return [s for p in self.passes for s in p.sites]

    def totals(self) -> dict[str, int]:
        return site_totals(self.sites)

    def kernel_counts(self) -> dict[str, int]:
        """Generated kernels: launch sites, distinct sources, FX nodes fused into them, fallbacks."""
        return {"kernels": len(self.kernels),
                "distinct_kernels": len({k.source_hash for k in self.kernels}),
                "fused_nodes": sum(len(k.nodes) for k in self.kernels),
                "fallbacks": len(self.fallbacks)}


def site_totals(sites: list[SiteRow]) -> dict[str, int]:
    """Parameters and FLOPs of every site seen, before and after (skipped sites unchanged)."""
    keys = ("params_before", "params_after", "flops_before", "flops_after")
    return {k: sum(getattr(s, k) for s in sites) for k in keys}


def _sum_counters(records: list[PassRecord]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for rec in records:
        acc = out.setdefault(rec.name, {"seen": 0, "rewritten": 0, "skipped": 0})
        for k, v in rec.counters.items():
            acc[k] += v
    return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no inf/nan; keep them readable and parseable
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]], markdown: bool) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


NO_GRAPH = ("effc compiled no graph. torch.compile compiles a module's forward when the module is "
            "called: compiled.generate(...) runs the original model's generate, which calls "
            "the uncompiled forward. For generate(), compile forward: "
            "model.forward = torch.compile(model.forward, backend='effc', options=...)\n")
_SITE_HEADERS = ["pass", "site", "decision", "params", "flops", "error"]
_PASS_HEADERS = ["pass", "status", "seen", "rewritten", "skipped", "seconds", "reason"]


def _site_cells(s: SiteRow) -> list[Any]:
    decision = s.decision if not s.reason else f"{s.decision}: {s.reason}"
    err = ", ".join(f"{k}={_fmt(v)}" for k, v in s.error.items())
    return [s.pass_name, s.site, decision, f"{s.params_before} -> {s.params_after}",
            f"{s.flops_before} -> {s.flops_after}", err]


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def render_graph(g: GraphReport, markdown: bool = False) -> str:
    """One graph's report as text or Markdown."""
    head = f"## {g.graph}" if markdown else f"effc report: {g.graph}"
    lines = [head, "", f"lowering: {g.lowering}; grad mode: {'on' if g.grad_enabled else 'off'}; "
             f"nodes: {g.nodes_before} -> {g.nodes_after}; compile: {g.compile_seconds:.3f}s"
             + (f"; re-derived after weight changes: {g.rederivations}x" if g.rederivations else ""),
             f"inputs: {g.inputs}", ""]
    if g.passes:
        rows = [[p.name, p.status, *p.counters.values(), p.seconds, p.reason] for p in g.passes]
        lines += [_table(_PASS_HEADERS, rows, markdown), ""]
    else:
        lines += ["no pass enabled: the graph runs as Dynamo traced it", ""]
    if g.sites:
        t = g.totals()
        lines += [_table(_SITE_HEADERS, [_site_cells(s) for s in g.sites], markdown), "",
                  f"total over sites: params {t['params_before']} -> {t['params_after']}, "
                  f"FLOPs {t['flops_before']} -> {t['flops_after']}", ""]
    if g.verify:
        keys = ["output", "max_abs", "rel_fro", "cosine", "sqnr_db", "agreement"]
        lines += ["verify (rewritten vs original on the example inputs):", "",
                  _table(keys, [[v.get(k, "") for k in keys] for v in g.verify], markdown), ""]
    if g.kernels or g.fallbacks:
        c = g.kernel_counts()
        lines += [f"triton: {c['kernels']} kernels ({c['distinct_kernels']} distinct) computing "
                  f"{c['fused_nodes']} FX nodes; {c['fallbacks']} left to eager", ""]
    if g.kernels:
        rows = [[k.name, k.kind, len(k.nodes), ", ".join(k.outputs), k.file] for k in g.kernels]
        lines += [_table(["kernel", "kind", "nodes", "outputs", "file"], rows, markdown), ""]
    if g.fallbacks:
        rows = [[f.kernel or "-", _short(", ".join(f.nodes)), f.reason] for f in g.fallbacks]
        lines += ["left to eager:", "", _table(["kernel", "nodes", "reason"], rows, markdown), ""]
    if g.eager_ops:
        what = {"library": "library calls", "views": "views and shape ops",
                "non-float": "ops on non-float values", "other": "float ops with no kernel"}
        lines += ["ops run eagerly between kernels:"] + [
            f"  {what[k]}: " + ", ".join(f"{name} x{c}" for name, c in ops.items())
            for k, ops in g.eager_ops.items()] + [""]
    lines += [f"warning: {w}" for w in g.warnings]
    lines += [f"note: {n}" for n in g.notes]
    return "\n".join(lines).rstrip() + "\n"


@dataclasses.dataclass
class Report:
    """The graphs effc compiled (one per Dynamo graph; graph breaks give several)."""

    graphs: list[GraphReport] = dataclasses.field(default_factory=list)

    @property
    def sites(self) -> list[SiteRow]:
        return [s for g in self.graphs for s in g.sites]

    def counters(self) -> dict[str, dict[str, int]]:
        """pass name -> {seen, rewritten, skipped}, summed over graphs."""
        return _sum_counters([p for g in self.graphs for p in g.passes])

    def to_dict(self) -> dict[str, Any]:
        return _json_safe({"graphs": [graph_to_dict(g) for g in self.graphs],
                           "counters": self.counters(), "totals": site_totals(self.sites)})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        if not self.graphs:
            return NO_GRAPH
        return "\n".join(render_graph(g, markdown=True) for g in self.graphs)

    def __str__(self) -> str:
        if not self.graphs:
            return NO_GRAPH
        return "\n".join(render_graph(g) for g in self.graphs)


def graph_to_dict(g: GraphReport) -> dict[str, Any]:
    d = dataclasses.asdict(g)
    for rec, p in zip(d["passes"], g.passes):
        rec["counters"] = p.counters
    d["counters"] = _sum_counters(g.passes)
    d["totals"] = g.totals()
    d["kernel_counts"] = g.kernel_counts()
    return _json_safe(d)
