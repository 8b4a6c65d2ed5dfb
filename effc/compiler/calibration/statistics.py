"""The statistics data-aware passes read, keyed by the names passes use (weight FQNs).

Every statistic is a streaming sum (float64), never stored activations; memory is [K, K] per
site. `effc.calibrate` (run.py) fills them through the observer (observer.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import torch


CALIBRATION_VERSION = 1
_FORMAT = "effc.calibration"
ROUTER_ROWS = 8192  # residual stream rows kept per residual add (token_skip's routers)
WHAT = ("inputs", "kv", "residuals", "attention")  # what calibrate(..., what=) accepts
_MISSING = "calibration has no statistics for"
MAX_AUTO_SHRINKAGE = 0.3  # shrinkage "auto": input features / rows, at most this


def shrink(moment: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) C + alpha (tr C / n) I: a whitening moment pulled toward the identity of the
    same trace, so directions the calibration rarely saw still count when fitting."""
    if alpha <= 0:
        return moment
    scale = moment.diagonal().mean()
    return (1 - alpha) * moment + alpha * scale * torch.eye(
        moment.shape[0], dtype=moment.dtype, device=moment.device)


def shrinkage_for(alpha: float | str, features: int, rows: int) -> float:
    """The shrinkage knob's value for a moment of `features` from `rows` rows: "auto" is
    features / rows, at most MAX_AUTO_SHRINKAGE (a moment from few rows per feature is
    trusted less; on MobileNetV2's classifier, 96 rows of 1280 features, shrinking kept 1-2 dB
    more output SQNR on other photos); rows 0 (a moment given directly) is taken as exact."""
    if alpha != "auto":
        return float(alpha)
    return min(MAX_AUTO_SHRINKAGE, features / rows) if rows > 0 else 0.0


@dataclasses.dataclass
class InputMoment:
    """sum over rows of x x^T (float64, [K, K]) and the row count, for one weight's input.

    `sample_xxt`/`sample_rows` are the part of those sums recorded during the calls kept as
    sample inputs: subtracting them gives moments independent of the samples, so a pass can
    fit on the rest and measure on the samples without measuring on its own fitting data.
    """

    sum_xxt: torch.Tensor
    rows: int                # 0: unknown (a moment given directly, see from_moments)
    sample_xxt: torch.Tensor | None = None
    sample_rows: int = 0

    def mean(self) -> torch.Tensor:
        return self.sum_xxt / max(self.rows, 1)

    def held_out_mean(self) -> torch.Tensor | None:
        """E[x x^T] over the rows not recorded in sample calls, or None if there are none."""
        rest = self.rows - self.sample_rows
        if self.sample_xxt is None or rest <= 0:
            return None
        return (self.sum_xxt - self.sample_xxt) / rest


@dataclasses.dataclass
class HeadMoments:
    """Per-head sums of a [B, H, T, D] tensor over batch and tokens (mean, covariance)."""

    sum: torch.Tensor        # [H, D] float64
    sum_outer: torch.Tensor  # [H, D, D] float64
    count: int               # tokens summed per head

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def moment(self) -> torch.Tensor:
        """E[k k^T] per head, [H, D, D]."""
        return self.sum_outer / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """E[k k^T] - E[k] E[k]^T per head, [H, D, D]."""
        mu = self.mean()
        return self.moment() - mu[:, :, None] * mu[:, None, :]


@dataclasses.dataclass
class ResidualNorms:
    """For `stream + update` at a residual add: sums of per-token norms and their ratio, and
    the first ROUTER_ROWS tokens' stream rows with their update norms (what token_skip fits
    its routers on, so every graph of a model routes by the same held data)."""

    sum_ratio: float = 0.0       # sum over tokens of ||update|| / ||stream||
    sum_sq_update: float = 0.0   # sum over tokens of ||update||^2
    sum_sq_stream: float = 0.0
    tokens: int = 0
    rows: torch.Tensor | None = None          # [N, d] float32, CPU: stream rows
    update_norms: torch.Tensor | None = None  # [N] float32, CPU: ||update|| of those rows

    def mean_ratio(self) -> float:
        return self.sum_ratio / max(self.tokens, 1)


@dataclasses.dataclass(eq=False)  # compared by identity: Dynamo compares backend options
class Calibration:
    """Activation statistics of one model, per weight FQN; pass as options={"calibration": c}.

    `kv` and `attention` are keyed by attention module path (`model.layers.0.self_attn`),
    `residuals` by the module of the branch's last projection (`model.layers.0.mlp.down_proj`).
    """

    inputs: dict[str, InputMoment] = dataclasses.field(default_factory=dict)
    weight_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    version: int = CALIBRATION_VERSION
    keys: dict[str, HeadMoments] = dataclasses.field(default_factory=dict)
    values: dict[str, HeadMoments] = dataclasses.field(default_factory=dict)
    residuals: dict[str, ResidualNorms] = dataclasses.field(default_factory=dict)
    attention: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)  # sites seen but not recorded
    batches: int = 0
    source: str = ""  # class name of the calibrated model, for messages
    # graph key (observer.graph_key) -> the first few calls' non-weight inputs, in placeholder
    # order: what passes run a graph on to measure the end-to-end effect of a rewrite
    samples: dict[str, list[tuple[Any, ...]]] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        """One screen: what was recorded and how much, never the tensors themselves."""
        rows = sorted({m.rows for m in self.inputs.values()})
        lines = [f"Calibration(source={self.source or '?'}, batches={self.batches}, "
                 f"version={self.version})"]
        if self.inputs:
            span = f"{rows[0]}" if len(rows) == 1 else f"{rows[0]}-{rows[-1]}"
            names = list(self.inputs)
            shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
            lines.append(f"  inputs: {len(names)} sites ({span} rows each): {shown}")
        for label, table in (("keys", self.keys), ("values", self.values)):
            if table:
                lines.append(f"  {label}: {len(table)} attention sites")
        if self.residuals:
            lines.append(f"  residuals: {len(self.residuals)} sites")
        if self.attention:
            lines.append(f"  attention maps: {sum(map(len, self.attention.values()))} over "
                         f"{len(self.attention)} sites")
        if self.samples:
            lines.append(f"  samples: {sum(map(len, self.samples.values()))} graph calls kept "
                         f"over {len(self.samples)} graphs")
        if self.notes:
            lines.append(f"  notes: {len(self.notes)} (see .notes)")
        return "\n".join(lines)

    @classmethod
    def from_moments(cls, moments: dict[str, torch.Tensor], rows: int | None = None,
                     weight_shapes: dict[str, tuple[int, ...]] | None = None) -> Calibration:
        """Statistics given directly: weight name -> E[x x^T] over `rows` rows (None: unknown,
        taken as exact, so low_rank's automatic shrinkage leaves it alone)."""
        return cls({k: InputMoment(v.to(torch.float64) * (rows or 1), rows or 0)
                    for k, v in moments.items()}, dict(weight_shapes or {}))

    # --- what passes read ------------------------------------------------------------------
    def input_moment(self, weight_name: str) -> torch.Tensor | None:
        """E[x x^T] of the input of the site that uses `weight_name`, or None if not recorded."""
        m = self.inputs.get(weight_name)
        return None if m is None else m.mean()

    def problem(self, weight_name: str, weight_shape: tuple[int, ...]) -> str:
        """Why this calibration cannot serve the site of `weight_name` (shape given), or ""."""
        shape = tuple(weight_shape)
        m = self.inputs.get(weight_name)
        recorded = self.weight_shapes.get(weight_name)
        if m is None:
            if recorded is not None:
                return (f"{_MISSING} {weight_name}: the calibration batches never reached a "
                        f"linear/conv site with that weight")
            if self.weight_shapes:
                return (f"{_MISSING} {weight_name}: the calibrated model"
                        f"{self._on()} has no weight of that name (a different model?)")
            return f"{_MISSING} {weight_name}"
        if recorded is not None and tuple(recorded) != shape:
            return (f"calibration was recorded for {weight_name} of shape {tuple(recorded)}"
                    f"{self._on()}, this model's is {shape} (a different model?)")
        k = m.sum_xxt.shape[0]
        fits = {math.prod(shape[1:]), shape[0]} if len(shape) >= 2 else set()
        if k not in fits:
            return (f"calibration's input moment for {weight_name} is {k}x{k}, which fits no "
                    f"input dimension of a weight of shape {shape} (a different model?)")
        return ""

    def lookup(self, weight_name: str, weight_shape: tuple[int, ...]
               ) -> tuple[torch.Tensor | None, str]:
        """(E[x x^T], "") for a site, or (None, why not): missing, or recorded for another model."""
        why = self.problem(weight_name, weight_shape)
        return (None, why) if why else (self.inputs[weight_name].mean(), "")

    def whitening_moment(self, weight_name: str, alpha: float | str, held_out: bool = False
                         ) -> torch.Tensor | None:
        """E[x x^T] (over the non-sample calls with `held_out`) shrunk as the passes'
        `shrinkage` knob says, or None when not recorded."""
        m = self.inputs.get(weight_name)
        moment = self.held_out_moment(weight_name) if held_out else self.input_moment(weight_name)
        if moment is None:
            return None
        rows = m.rows - m.sample_rows if held_out else m.rows
        return shrink(moment, shrinkage_for(alpha, moment.shape[0], rows))

    def held_out_moment(self, weight_name: str) -> torch.Tensor | None:
        """E[x x^T] without the rows of the sample calls (None if that leaves nothing)."""
        m = self.inputs.get(weight_name)
        return None if m is None else m.held_out_mean()

    def check(self, weights: Mapping[str, tuple[int, ...] | torch.Tensor]) -> dict[str, str]:
        """weight name -> problem, for the site weights of a model (shapes or the tensors).

        Pass the weights a pass would act on (linear/conv weights): a name missing from the
        calibration, or recorded with another shape, is reported; an empty dict means all fit.
        """
        out = {}
        for name, w in weights.items():
            why = self.problem(name, tuple(w.shape) if isinstance(w, torch.Tensor) else w)
            if why:
                out[name] = why
        return out

    def _on(self) -> str:
        return f" (recorded on {self.source})" if self.source else ""

    # --- what the observer writes (streaming, float64) ---------------------------------------
    def add_input(self, name: str, rows: torch.Tensor, sample: bool = False) -> None:
        """Add x^T x of a [N, K] block of input rows to the moment of `name` (and to its
        sample part when the rows come from a call kept as a sample)."""
        m = self.inputs.get(name)
        if m is None:
            k = rows.shape[1]
            m = self.inputs[name] = InputMoment(
                torch.zeros(k, k, dtype=torch.float64, device=rows.device), 0)
        x = rows.detach().to(m.sum_xxt.device, torch.float64)
        m.sum_xxt.addmm_(x.T, x)
        m.rows += x.shape[0]
        if sample:
            if m.sample_xxt is None:
                m.sample_xxt = torch.zeros_like(m.sum_xxt)
            m.sample_xxt.addmm_(x.T, x)
            m.sample_rows += x.shape[0]

    def add_heads(self, table: str, name: str, t: torch.Tensor) -> None:
        """Add per-head sums of a [B, H, T, D] tensor to `self.keys` or `self.values`."""
        stats: dict[str, HeadMoments] = getattr(self, table)
        x = t.detach().to(torch.float64)
        h, d = x.shape[1], x.shape[3]
        m = stats.get(name)
        if m is None:
            m = stats[name] = HeadMoments(x.new_zeros(h, d), x.new_zeros(h, d, d), 0)
        x = x.to(m.sum.device)
        m.sum += x.sum(dim=(0, 2))
        m.sum_outer += torch.einsum("bhtd,bhte->hde", x, x)
        m.count += x.shape[0] * x.shape[2]

    def add_residual(self, name: str, stream: torch.Tensor, update: torch.Tensor) -> None:
        """Add per-token norms of one residual add (last dim is the feature dim)."""
        s = stream.detach().to(torch.float64).norm(dim=-1).flatten()
        u = update.detach().to(torch.float64).norm(dim=-1).flatten()
        r = self.residuals.setdefault(name, ResidualNorms())
        r.sum_ratio += float((u / s.clamp_min(1e-30)).sum())
        r.sum_sq_update += float(u.square().sum())
        r.sum_sq_stream += float(s.square().sum())
        r.tokens += s.numel()
        have = 0 if r.rows is None else r.rows.shape[0]
        if have < ROUTER_ROWS and stream.shape[-1] == update.shape[-1]:
            take = ROUTER_ROWS - have
            x = stream.detach().reshape(-1, stream.shape[-1])[:take].to("cpu", torch.float32)
            n = u[:take].to("cpu", torch.float32)
            r.rows = x if r.rows is None else torch.cat([r.rows, x])
            r.update_norms = n if r.update_norms is None else torch.cat([r.update_norms, n])

    def add_attention_map(self, name: str, probs: torch.Tensor, limit: int) -> None:
        """Keep up to `limit` attention maps ([H, Tq, Tk], float32, CPU) for `name`."""
        kept = self.attention.setdefault(name, [])
        if len(kept) < limit:
            kept.append(probs.detach().to("cpu", torch.float32).clone())

    def add_sample(self, key: str, inputs: Sequence[Any], limit: int) -> bool:
        """Keep a copy (CPU) of one call's non-weight graph inputs, up to `limit` per graph;
        True if this call was kept."""
        kept = self.samples.setdefault(key, [])
        if len(kept) >= limit:
            return False
        kept.append(tuple(t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor)
                          else t for t in inputs))
        return True

    def sample_inputs(self, key: str) -> list[tuple[Any, ...]]:
        """The recorded inputs of the graph with key `key` (observer.graph_key), or []."""
        return self.samples.get(key, [])

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def to(self, device: str | torch.device) -> Calibration:
        """Move every statistic to `device` in place (calibrate returns CPU statistics)."""
        for m in self.inputs.values():
            m.sum_xxt = m.sum_xxt.to(device)
            if m.sample_xxt is not None:
                m.sample_xxt = m.sample_xxt.to(device)
        for m in itertools.chain(self.keys.values(), self.values.values()):
            m.sum, m.sum_outer = m.sum.to(device), m.sum_outer.to(device)
        return self

    # --- files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike | BinaryIO) -> None:
        """Write plain tensors, dicts and numbers (loadable with weights_only=True)."""
        heads = lambda d: {k: {"sum": m.sum, "sum_outer": m.sum_outer, "count": m.count}
                           for k, m in d.items()}  # noqa: E731
        torch.save({
            "format": _FORMAT, "version": self.version, "source": self.source,
            "batches": self.batches, "notes": list(self.notes),
            "inputs": {k: {"sum_xxt": m.sum_xxt, "rows": m.rows, "sample_xxt": m.sample_xxt,
                           "sample_rows": m.sample_rows} for k, m in self.inputs.items()},
            "weight_shapes": {k: list(v) for k, v in self.weight_shapes.items()},
            "keys": heads(self.keys), "values": heads(self.values),
            "residuals": {k: dataclasses.asdict(r) for k, r in self.residuals.items()},
            "attention": {k: list(v) for k, v in self.attention.items()},
            "samples": {k: [list(call) for call in v] for k, v in self.samples.items()},
        }, path)

    @classmethod
    def load(cls, path: str | os.PathLike | BinaryIO) -> Calibration:
        """Read a file written by `save`; a foreign file or an unknown version is a ValueError."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"{path}: not an effc calibration file (written by Calibration.save)")
        if data.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"{path}: effc calibration format version {data.get('version')!r} "
                             f"is not supported; this effc reads version {CALIBRATION_VERSION} "
                             f"(re-run effc.calibrate)")
        heads = lambda d: {k: HeadMoments(m["sum"], m["sum_outer"], m["count"])
                           for k, m in d.items()}  # noqa: E731
        return cls(
            inputs={k: InputMoment(m["sum_xxt"], m["rows"], m.get("sample_xxt"),
                                   m.get("sample_rows", 0)) for k, m in data["inputs"].items()},
            weight_shapes={k: tuple(v) for k, v in data["weight_shapes"].items()},
            version=data["version"], keys=heads(data["keys"]), values=heads(data["values"]),
            residuals={k: ResidualNorms(**r) for k, r in data["residuals"].items()},
            attention={k: list(v) for k, v in data["attention"].items()},
            notes=list(data["notes"]), batches=data["batches"], source=data["source"],
            samples={k: [tuple(call) for call in v] for k, v in data.get("samples", {}).items()})
