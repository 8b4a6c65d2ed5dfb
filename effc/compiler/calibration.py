"""Calibration statistics for data-aware passes, keyed by the names passes use (weight FQNs).

`calibrate(model, batches)` compiles the model with an observer backend
(effc/compiler/observer.py): the same Dynamo graphs effc compiles, so names agree. Every
statistic is a streaming sum (float64), never stored activations; memory is [K, K] per site.

Recorded, per `what`:
- "inputs": sum x x^T and the row count of the input of every `linear(x, W)`,
  `addmm(b, x, W)` / `matmul(x, W)` with a 2-D W (GPT-2's Conv1D), and `conv1d`/`conv2d` with
  groups == 1 (rows are the unfolded patches, ordered like W.reshape(C_out, -1)); keyed by W.
- "kv": per-head sums of K and V ([B, H, T, D], H = key/value heads under grouped-query
  attention, also where HF repeats them to the query heads for a masked SDPA) at
  `scaled_dot_product_attention`, keyed by the attention module.
- "residuals": per-token ||update|| / ||stream|| at `stream + update` where the update is a
  site's output computed from the stream, keyed by that site's weight.
- "attention": up to `attention_maps` maps (first sample of a batch) per attention, from
  SDPA's q, k, mask and scale, or from an eager attention's softmax.
Not recorded: grouped or conv3d convs, weights used through a transform (e.g. `W.t()`), K/V of
eager (matmul + softmax) attention.

Padding: with a [B, T] token mask (tokenizer output's `attention_mask`; see `calibrate`'s
`token_mask`), inputs, K/V and residuals count real tokens only, so padded batches give the
statistics of their unpadded sequences. The mask is applied where a site's tensor is laid out
as [B, T, ...] (K/V: [B, H, T, D]) or is a [B*T, K] reshape of a [B, T, K] tensor; elsewhere
(convs, pooled or otherwise reshaped inputs) every position counts and `notes` says so.
Attention maps are kept whole (padded rows and columns included).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

import torch

from effc.compiler import observer

CALIBRATION_VERSION = 1
_FORMAT = "effc.calibration"
WHAT = ("inputs", "kv", "residuals", "attention")  # what calibrate(..., what=) accepts
_MISSING = "calibration has no statistics for"


@dataclasses.dataclass
class InputMoment:
    """sum over rows of x x^T (float64, [K, K]) and the row count, for one weight's input."""

    sum_xxt: torch.Tensor
    rows: int

    def mean(self) -> torch.Tensor:
        return self.sum_xxt / max(self.rows, 1)


@dataclasses.dataclass
class HeadMoments:
    """Per-head sums of a [B, H, T, D] tensor over batch and tokens (mean, covariance)."""

    sum: torch.Tensor        # [H, D] float64
    sum_outer: torch.Tensor  # [H, D, D] float64
    count: int               # tokens summed per head

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """E[k k^T] - E[k] E[k]^T per head, [H, D, D]."""
        mu = self.mean()
        return self.sum_outer / max(self.count, 1) - mu[:, :, None] * mu[:, None, :]


@dataclasses.dataclass
class ResidualNorms:
    """For `stream + update` at a residual add: sums of per-token norms and their ratio."""

    sum_ratio: float = 0.0       # sum over tokens of ||update|| / ||stream||
    sum_sq_update: float = 0.0   # sum over tokens of ||update||^2
    sum_sq_stream: float = 0.0
    tokens: int = 0

    def mean_ratio(self) -> float:
        return self.sum_ratio / max(self.tokens, 1)


@dataclasses.dataclass
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

    @classmethod
    def from_moments(cls, moments: dict[str, torch.Tensor], rows: int = 1,
                     weight_shapes: dict[str, tuple[int, ...]] | None = None) -> Calibration:
        """Statistics given directly: weight name -> E[x x^T] (or a sum with `rows`)."""
        return cls({k: InputMoment(v.to(torch.float64) * rows, rows) for k, v in moments.items()},
                   dict(weight_shapes or {}))

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
    def add_input(self, name: str, rows: torch.Tensor) -> None:
        """Add x^T x of a [N, K] block of input rows to the moment of `name`."""
        m = self.inputs.get(name)
        if m is None:
            k = rows.shape[1]
            m = self.inputs[name] = InputMoment(
                torch.zeros(k, k, dtype=torch.float64, device=rows.device), 0)
        x = rows.detach().to(m.sum_xxt.device, torch.float64)
        m.sum_xxt.addmm_(x.T, x)
        m.rows += x.shape[0]

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

    def add_attention_map(self, name: str, probs: torch.Tensor, limit: int) -> None:
        """Keep up to `limit` attention maps ([H, Tq, Tk], float32, CPU) for `name`."""
        kept = self.attention.setdefault(name, [])
        if len(kept) < limit:
            kept.append(probs.detach().to("cpu", torch.float32).clone())

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def to(self, device: str | torch.device) -> Calibration:
        """Move every statistic to `device` in place (calibrate returns CPU statistics)."""
        for m in self.inputs.values():
            m.sum_xxt = m.sum_xxt.to(device)
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
            "inputs": {k: {"sum_xxt": m.sum_xxt, "rows": m.rows} for k, m in self.inputs.items()},
            "weight_shapes": {k: list(v) for k, v in self.weight_shapes.items()},
            "keys": heads(self.keys), "values": heads(self.values),
            "residuals": {k: dataclasses.asdict(r) for k, r in self.residuals.items()},
            "attention": {k: list(v) for k, v in self.attention.items()},
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
            inputs={k: InputMoment(m["sum_xxt"], m["rows"]) for k, m in data["inputs"].items()},
            weight_shapes={k: tuple(v) for k, v in data["weight_shapes"].items()},
            version=data["version"], keys=heads(data["keys"]), values=heads(data["values"]),
            residuals={k: ResidualNorms(**r) for k, r in data["residuals"].items()},
            attention={k: list(v) for k, v in data["attention"].items()},
            notes=list(data["notes"]), batches=data["batches"], source=data["source"])


def _call(model: Any, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(f"effc.calibrate: a batch must be a Tensor, a tuple/list of arguments or a "
                    f"dict of keyword arguments, got {type(batch).__name__}")


def _token_mask(batch: Any, token_mask: str | None, i: int, calib: Calibration
                ) -> torch.Tensor | None:
    """The batch's [B, T] bool mask of real tokens, or None: no masking, or nothing padded.

    An explicit key is a promise about every batch, so a missing or malformed mask is an
    error; "auto" never fails a batch the model accepts: it notes why padding is counted.
    """
    if token_mask is None:
        return None
    auto = token_mask == "auto"
    key = "attention_mask" if auto else token_mask
    arg = f"effc.calibrate: token_mask={token_mask!r}"
    if not isinstance(batch, Mapping) or key not in batch:
        if auto:
            return None
        got = (f"keys {sorted(map(str, batch))}" if isinstance(batch, Mapping)
               else f"a {type(batch).__name__}, not a dict")
        raise ValueError(f"{arg}: batch {i} has no {key!r} ({got})")
    mask = batch[key]
    problem = ""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        problem = f"batch[{key!r}] is {shape}, not a 2-D [batch, tokens] mask"
    else:
        for other in ("input_ids", "inputs_embeds"):
            t = batch.get(other)
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[:2] != mask.shape:
                problem = (f"batch[{key!r}] has shape {tuple(mask.shape)} but batch[{other!r}] "
                           f"has {tuple(t.shape)}")
                break
        else:
            if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
                problem = f"batch[{key!r}] holds values other than 0 and 1"
    if problem and auto:
        calib.note(f"token mask: {problem}; padding positions counted (token_mask='auto')")
        return None
    if problem:
        raise ValueError(f"{arg}: {problem} (batch {i})")
    mask = mask.detach() != 0
    return None if bool(mask.all()) else mask


def calibrate(model: torch.nn.Module, batches: Iterable[Any], *,
              what: Iterable[str] = ("inputs",), max_batches: int | None = None,
              progress: bool = True, attention_maps: int = 4,
              token_mask: str | None = "auto") -> Calibration:
    """Run `model` on `batches` and record, per site, the statistics data-aware passes use.

    A batch is a Tensor (`model(batch)`), a tuple/list (`model(*batch)`) or a dict
    (`model(**batch)`, e.g. tokenizer output). `what` selects among "inputs" (E[x x^T] of
    linear/conv inputs), "kv" (per-head K/V moments at scaled_dot_product_attention),
    "residuals" (update/stream norms at residual adds) and "attention" (up to
    `attention_maps` attention maps per attention site, first sample of a batch). The model
    runs in eval mode under no_grad; its training flags are restored afterwards.

    `token_mask` keeps padding out of the statistics: the key of dict batches holding a
    [B, T] mask (1 = real token, 0 = padding), whose zero positions are left out of "inputs",
    "kv" and "residuals" (and their counts). "auto" (default) uses `attention_mask` where a
    dict batch has a 2-D one and records other batches whole; a key name requires that mask
    in every batch (ValueError otherwise); None records every position. Sites whose tensors
    are not laid out as [batch, tokens, ...] record every position, with a note.
    """
    what = (what,) if isinstance(what, str) else tuple(what)
    unknown = [w for w in what if w not in WHAT]
    if unknown or not what:
        raise ValueError(f"effc.calibrate: what={what!r}: expected some of {', '.join(WHAT)}")
    if token_mask is not None and not isinstance(token_mask, str):
        raise ValueError(f"effc.calibrate: token_mask={token_mask!r}: expected the key of the "
                         f"batches' mask, 'auto' or None")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"effc.calibrate: max_batches must be >= 1, got {max_batches}")
    from tqdm.auto import tqdm

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module: observe the original
    calib = Calibration(source=type(model).__name__)
    session = observer.Session(calib, frozenset(what), attention_maps)
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
        total = max_batches if total is None else min(total, max_batches)
    compiled = torch.compile(model, backend=observer.observer_backend)
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), observer.recording(session):
            for i, batch in enumerate(tqdm(batches, total=total, disable=not progress,
                                           desc="effc calibrate", unit="batch")):
                before = session.graph_calls
                session.mask = _token_mask(batch, token_mask, i, calib)
                _call(compiled, batch)
                if session.graph_calls == before:
                    raise RuntimeError(f"effc.calibrate: batch {i} ran without reaching the "
                                       "observer (Dynamo ran it eagerly: compilation disabled "
                                       "or the recompile limit was hit)")
                calib.batches += 1
    finally:
        session.mask = None
        for m, flag in training.items():
            m.training = flag
    if calib.batches == 0:
        raise ValueError("effc.calibrate: no batches were given")
    return calib.to("cpu")
