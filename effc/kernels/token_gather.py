"""The token_skip pass's ops (Mixture-of-Depths: only some tokens go through an MLP block).

``effc::token_route`` picks the tokens from router scores as flat row indices into the
[B * T, D] activations (ascending: each sequence keeps its token order), ``token_gather`` packs
those rows so the block runs on M rows instead of B * T, and ``token_scatter_add`` adds the
block's output, optionally scaled by a router weight, back onto the residual stream. Ops, not
indexing in the graph, so the fake implementations state the routed size once (exact for
top-k, data-dependent for a threshold) and CUDA runs one Triton kernel each for the gather and
the scatter (token_gather_triton.py).

The scatter adds in at least fp32 (``x + update * weight``, each op rounded to fp32) and rounds
once to x's dtype: bit-exact ``x.index_add(0, index, update * weight[:, None])`` for fp32, and
no 16-bit rounding of the product for bf16/fp16. The Triton kernel computes the same way.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from effc.kernels.low_rank import lazy_triton
from effc.kernels.ordering import stable_top_k


def route_count(tokens: int, capacity: float) -> int:
    """Tokens kept per row in top-k mode: min(T, max(0, ceil(capacity * T - 1e-9)))."""
    return min(tokens, max(0, math.ceil(capacity * tokens - 1e-9)))


def _check_route(scores: Tensor, capacity: float) -> None:
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"token_route expects float scores [B, T]; got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    if not math.isfinite(capacity):
        raise ValueError(f"token_route: capacity must be finite; got {capacity}")


def _check_index(name: str, x: Tensor, index: Tensor) -> None:
    if x.dim() != 2 or index.dim() != 1 or index.dtype != torch.int64 or \
            index.device != x.device:
        raise ValueError(f"{name} expects x [N, D] and an int64 index [M] on x's device; got x "
                         f"{tuple(x.shape)} on {x.device}, index {index.dtype} "
                         f"{tuple(index.shape)} on {index.device}")


def _check_scatter(x: Tensor, index: Tensor, update: Tensor, weight: Optional[Tensor]) -> None:
    _check_index("token_scatter_add", x, index)
    m = index.shape[0]
    bad_weight = weight is not None and (tuple(weight.shape) != (m,) or
                                         not weight.is_floating_point() or
                                         weight.device != x.device)
    if not x.is_floating_point() or not update.is_floating_point() or \
            tuple(update.shape) != (m, x.shape[1]) or update.device != x.device or bad_weight:
        raise ValueError(f"token_scatter_add expects float x [N, D], update [M, D] and weight "
                         f"[M] or None, for an index [M], on one device; got x "
                         f"{tuple(x.shape)} {x.dtype}, index {tuple(index.shape)}, update "
                         f"{tuple(update.shape)} {update.dtype}, weight "
                         f"{None if weight is None else (tuple(weight.shape), weight.dtype)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the scatter adds in: fp32 for 16-bit and fp32 tensors, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def token_route_reference(scores: Tensor, capacity: float,
                          threshold: Optional[float] = None) -> Tensor:
    """Flat indices b * T + t (int64, ascending) of the tokens to process.

    threshold None: per row, the route_count(T, capacity) highest scores; equal scores prefer
    the lower index (a stable sort), NaN ranks above every number (torch.sort's order).
    Otherwise every token with score >= threshold, compared in at least fp32 (causal: a token's
    decision reads its own score only)."""
    _check_route(scores, capacity)
    rows, tokens = scores.shape
    if threshold is not None:
        keep = scores.to(compute_dtype(scores.dtype)) >= threshold
        return torch.nonzero(keep.reshape(-1)).reshape(-1)
    k = route_count(tokens, capacity)
    order = stable_top_k(scores, k)
    if rows == 1:  # one sequence: its columns are the flat indices
        return order.reshape(-1)
    base = torch.arange(rows, dtype=torch.int64, device=scores.device)[:, None] * tokens
    return (order + base).reshape(-1)


def token_gather_reference(x: Tensor, index: Tensor) -> Tensor:
    """x's rows `index`, [M, D]: the CPU implementation and the Triton kernel's oracle."""
    _check_index("token_gather", x, index)
    return x.index_select(0, index)


def token_scatter_add_reference(x: Tensor, index: Tensor, update: Tensor,
                                weight: Optional[Tensor] = None) -> Tensor:
    """A copy of x with rows `index` (unique) replaced by x + update * weight, computed in
    compute_dtype(x.dtype) and rounded once to x's dtype."""
    _check_scatter(x, index, update, weight)
    ct = compute_dtype(x.dtype)
    if weight is None and ct == x.dtype and update.dtype == x.dtype and x.is_contiguous():
        return x.index_add(0, index, update)  # one rounding already: the same values, faster
    upd = update.to(ct)
    if weight is not None:
        upd = upd * weight.to(ct)[:, None]
    rows = (x.index_select(0, index).to(ct) + upd).to(x.dtype)
    return x.clone(memory_format=torch.contiguous_format).index_copy_(0, index, rows)


@torch.library.custom_op("effc::token_route", mutates_args=())
def _token_route(scores: Tensor, capacity: float, threshold: Optional[float] = None) -> Tensor:
    """Torch on every device (a top-k or a nonzero; no kernel of ours)."""
    return token_route_reference(scores, capacity, threshold)


@_token_route.register_fake
def _(scores, capacity, threshold=None):
    _check_route(scores, capacity)
    rows, tokens = scores.shape
    if threshold is None and isinstance(tokens, int):  # B may be symbolic: B * k still is exact
        return scores.new_empty((rows * route_count(tokens, capacity),), dtype=torch.int64)
    size = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty((size,), dtype=torch.int64)


@torch.library.custom_op("effc::token_gather", mutates_args=())
def _token_gather(x: Tensor, index: Tensor) -> Tensor:
    return token_gather_reference(x, index)


_token_gather.register_kernel("cuda")(
    lazy_triton("effc.kernels.token_gather_triton", "token_gather_triton",
                token_gather_reference))


@_token_gather.register_fake
def _(x, index):
    _check_index("token_gather", x, index)
    return x.new_empty((index.shape[0], x.shape[1]))


@torch.library.custom_op("effc::token_scatter_add", mutates_args=())
def _token_scatter_add(x: Tensor, index: Tensor, update: Tensor,
                       weight: Optional[Tensor] = None) -> Tensor:
    return token_scatter_add_reference(x, index, update, weight)


_token_scatter_add.register_kernel("cuda")(
    lazy_triton("effc.kernels.token_gather_triton", "token_scatter_add_triton",
                token_scatter_add_reference))


@_token_scatter_add.register_fake
def _(x, index, update, weight=None):
    _check_scatter(x, index, update, weight)
    return x.new_empty(x.shape)


def token_route(scores: Tensor, capacity: float, threshold: Optional[float] = None) -> Tensor:
    """``effc::token_route``: see token_route_reference."""
    return torch.ops.effc.token_route(scores, capacity, threshold)


def token_gather(x: Tensor, index: Tensor) -> Tensor:
    """``effc::token_gather``: ``x.index_select(0, index)``."""
    return torch.ops.effc.token_gather(x, index)


def token_scatter_add(x: Tensor, index: Tensor, update: Tensor,
                      weight: Optional[Tensor] = None) -> Tensor:
    """``effc::token_scatter_add``: see token_scatter_add_reference."""
    return torch.ops.effc.token_scatter_add(x, index, update, weight)
