"""``effc::phm_conv``: a PHC convolution, weight sum_t a_t kron s_t over (out, in) channels.

a: [T, n, n], s: [T, p, q, *k]; the weight is [n p, n q, *k]. Two ways to run it:
- materialized (the op): build W (T n^2 p q k multiply-adds, far below the conv's own cost
  on any feature map) and call the library conv;
- grouped (`phm_conv_grouped`): one grouped conv of the n input blocks with the stacked s
  ([n T p, q, *k], groups = n), then the small a mixing. Same FLOPs as the dense conv
  for T = n, but it reads the stacked s n times and writes an n T p-channel intermediate.
On CPU the materialized form is faster at every size measured (benchmarks/
bench_hypercomplex.py), so the op materializes; the grouped form is kept as the reference
the benchmark measures against.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from effc.kernels.phm import kron_weight

_CONVS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _check(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, bias: Optional[torch.Tensor],
           stride: list[int], padding: list[int], dilation: list[int]) -> None:
    spatial = s.dim() - 3
    if a.dim() != 3 or a.shape[1] != a.shape[2] or s.dim() - 1 not in _CONVS or \
            a.shape[0] != s.shape[0]:
        raise ValueError(f"phm_conv: expected a [T, n, n] and s [T, p, q, *k]; got a "
                         f"{tuple(a.shape)}, s {tuple(s.shape)}")
    n, q = a.shape[1], s.shape[2]
    if x.dim() not in (spatial + 1, spatial + 2) or x.shape[-spatial - 1] != n * q:
        raise ValueError(f"phm_conv: x needs {n * q} channels and {spatial} spatial dims; got "
                         f"x {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n * s.shape[1],):
        raise ValueError(f"phm_conv: bias must be ({n * s.shape[1]},), got {tuple(bias.shape)}")
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(value) != spatial:
            raise ValueError(f"phm_conv: {name} needs {spatial} values, got {value}")


@torch.library.custom_op("effc::phm_conv", mutates_args=())
def phm_conv(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, bias: Optional[torch.Tensor],
             stride: list[int], padding: list[int], dilation: list[int]) -> torch.Tensor:
    """conv(x, sum_t a_t kron s_t, bias; stride, padding, dilation), weight materialized."""
    _check(x, a, s, bias, stride, padding, dilation)
    return _CONVS[s.dim() - 1](x, kron_weight(a, s), bias, stride, padding, dilation)


@phm_conv.register_fake
def _(x, a, s, bias, stride, padding, dilation):
    _check(x, a, s, bias, stride, padding, dilation)
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // st + 1
        for size, k, st, p, d in zip(x.shape[-len(stride):], s.shape[3:], stride, padding,
                                     dilation)
    ]
    return x.new_empty((*x.shape[:-len(stride) - 1], a.shape[1] * s.shape[1], *spatial))


def phm_conv_grouped(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                     bias: Optional[torch.Tensor], stride: list[int], padding: list[int],
                     dilation: list[int]) -> torch.Tensor:
    """The same conv without building W: grouped conv with the stacked s, then a mixing."""
    _check(x, a, s, bias, stride, padding, dilation)
    terms, n, _ = a.shape
    p = s.shape[1]
    stacked = s.reshape(terms * p, *s.shape[2:]).repeat(n, *([1] * (s.dim() - 2)))
    z = _CONVS[s.dim() - 1](x, stacked, None, stride, padding, dilation, n)
    lead, spatial = z.shape[0], z.shape[2:]
    z = z.reshape(lead, n, terms, p, *spatial)          # [B, j, t, p, ...]
    y = torch.einsum("bjtp...,tij->bip...", z, a).reshape(lead, n * p, *spatial)
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * len(spatial)))
    return y
