"""`effc.calibrate(model, batches)`: run the model through the observer and collect statistics.

`calibrate(model, batches)` compiles the model with an observer backend
(observer.py): the same Dynamo graphs effc compiles, so names agree. Every
statistic is a streaming sum (float64), never stored activations; memory is [K, K] per site.

Recorded, per `what`:
- "inputs": sum x x^T and the row count of the input of every `linear(x, W)`,
  `addmm(b, x, W)` / `matmul(x, W)` with a 2-D W (GPT-2's Conv1D), and `conv1d`/`conv2d` with
  groups == 1 (rows are the unfolded patches, ordered like W.reshape(C_out, -1)); keyed by W.
- "kv": per-head sums of K and V ([B, H, T, D], H = key/value heads under grouped-query
  attention, also where HF repeats them to the query heads for a masked SDPA) at
  `scaled_dot_product_attention`, keyed by the attention module.
- "residuals": per-token ||update|| / ||stream|| at `stream + update` where the update is a
  site's output computed from the stream, keyed by that site's weight, and the first
  ROUTER_ROWS tokens' stream rows with their update norms (token_skip's router data).
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

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from effc.compiler.calibration import observer
from effc.compiler.calibration.statistics import WHAT, Calibration


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
              token_mask: str | None = "auto", samples: int = 4) -> Calibration:
    """Run `model` on `batches` and record, per site, the statistics data-aware passes use.

    A batch is a Tensor (`model(batch)`), a tuple/list (`model(*batch)`) or a dict
    (`model(**batch)`, e.g. tokenizer output). `what` selects among "inputs" (E[x x^T] of
    linear/conv inputs), "kv" (per-head K/V moments at scaled_dot_product_attention),
    "residuals" (update/stream norms at residual adds, and some tokens' rows: what token_skip
    fits its routers on) and "attention" (up to
    `attention_maps` attention maps per attention site, first sample of a batch). The model
    runs in eval mode under no_grad; its training flags are restored afterwards.

    `token_mask` keeps padding out of the statistics: the key of dict batches holding a
    [B, T] mask (1 = real token, 0 = padding), whose zero positions are left out of "inputs",
    "kv" and "residuals" (and their counts). "auto" (default) uses `attention_mask` where a
    dict batch has a 2-D one and records other batches whole; a key name requires that mask
    in every batch (ValueError otherwise); None records every position. Sites whose tensors
    are not laid out as [batch, tokens, ...] record every position, with a note.

    `samples` graph calls (the first ones) keep a CPU copy of their non-weight inputs, per
    compiled graph: passes run the graph on them to measure a rewrite's end-to-end effect.
    """
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise ValueError(f"effc.calibrate: samples must be an int >= 0, got {samples!r}")
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
    session = observer.Session(calib, frozenset(what), attention_maps, samples)
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
