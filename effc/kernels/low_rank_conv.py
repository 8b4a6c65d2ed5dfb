"""``effc::low_rank_conv``: a k x k convolution to r channels followed by a 1 x 1 convolution.

The factorized form of a conv whose weight W [C_out, C_in, *k] was approximated as
u @ v with u [C_out, r] and v [r, C_in * prod(k)]: the first conv applies v (stride,
padding and dilation of the original), the second mixes the r channels into C_out and adds
the bias. Both steps are library convolutions on every device (cuDNN does them well), so
this family has a torch implementation and a fake implementation, and no Triton kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_CONVS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _check(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor],
           stride: list[int], padding: list[int], dilation: list[int]) -> None:
    spatial = v.dim() - 2
    if v.dim() not in _CONVS or u.dim() != v.dim() or x.dim() not in (v.dim(), v.dim() - 1):
        raise ValueError(f"low_rank_conv: expected v [r, C_in, *k], u [C_out, r, 1...] and x with "
                         f"{spatial} spatial dims; got x {tuple(x.shape)}, v {tuple(v.shape)}, "
                         f"u {tuple(u.shape)}")
    if u.shape[1] != v.shape[0] or any(s != 1 for s in u.shape[2:]):
        raise ValueError(f"low_rank_conv: u must be [C_out, r, 1...] with r = v.shape[0] = "
                         f"{v.shape[0]}; got u {tuple(u.shape)}")
    if bias is not None and tuple(bias.shape) != (u.shape[0],):
        raise ValueError(f"low_rank_conv: bias must be ({u.shape[0]},), got {tuple(bias.shape)}")
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(value) != spatial:
            raise ValueError(f"low_rank_conv: {name} needs {spatial} values, got {value}")


@torch.library.custom_op("effc::low_rank_conv", mutates_args=())
def low_rank_conv(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor],
                  stride: list[int], padding: list[int], dilation: list[int]) -> torch.Tensor:
    """conv(x, v; stride, padding, dilation) followed by the 1 x 1 conv with u and bias."""
    _check(x, v, u, bias, stride, padding, dilation)
    conv = _CONVS[v.dim()]
    return conv(conv(x, v, None, stride, padding, dilation), u, bias)


@low_rank_conv.register_fake
def _(x, v, u, bias, stride, padding, dilation):
    _check(x, v, u, bias, stride, padding, dilation)
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(x.shape[-len(stride):], v.shape[2:], stride, padding, dilation)
    ]
    return x.new_empty((*x.shape[:-len(stride) - 1], u.shape[0], *spatial))
