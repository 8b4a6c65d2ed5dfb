"""Top-k by a stable order, shared by the ops that pick rows by score (token_route,
select_tokens): their CPU paths, and the oracles of their Triton kernels."""

from __future__ import annotations

import torch
from torch import Tensor


# CPU rows shorter than this: the sort (2 ops) beats topk and its checks (5). Measured
# (2-core EPYC, torch 2.13, one row, k 256 or N/2): sort 13-30 us vs topk 17-25 us at 512 to
# 2048 values; at 4096 the sort takes 142-220 us and topk 26-36 us.
SORT_BELOW = 2048


def stable_top_k(values: Tensor, k: int, sort: bool | None = None) -> Tensor:
    """Per row of `values` [R, N], the column indices [R, k] (int64, ascending) of the k
    largest: a stable descending sort's first k (equal values: the lower index; NaN above
    every number). Long rows on the CPU: found in O(N) with topk when no other value ties the
    k-th largest. That check reads values back to the host, so on a GPU (`sort`, the
    default off the CPU) the sort itself is used: no synchronization, and CUDA graphs can
    capture it. So are rows shorter than SORT_BELOW on the CPU: between a model's large
    matmuls each small op costs ~25 us (measured in a routed Llama at 1024 tokens), so two
    ops beat five."""
    rows = values.shape[0]
    if k == 0:
        return values.new_empty((rows, 0), dtype=torch.int64)
    if sort is None:
        sort = values.device.type != "cpu" or values.shape[1] < SORT_BELOW
    if sort or values.isnan().any():  # (NaN outranks every number in a descending sort)
        top = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
        return top.sort(dim=1).values
    vals, top = torch.topk(values, k, dim=1, sorted=False)
    kth = vals.min(1, keepdim=True).values
    if bool(((values >= kth).sum(1) == k).all()):
        return top.sort(dim=1).values
    above = values > kth  # ties at the k-th: all above it, then its equals from the lowest index
    equal = values == kth
    take = above | (equal & (equal.cumsum(1) <= k - above.sum(1, keepdim=True)))
    return take.nonzero()[:, 1].reshape(rows, k)
