"""PHM layers written the way their reference implementations write them (HyperNets).

W = sum_i kron(a_i, s_i) with a: (n, n, n) and s: (n, out/n, in/n) is rebuilt by a
broadcast product and a sum at every forward, then a dense linear runs: the form whose
slowness users report, and the form effc's hypercomplex pass recognizes and rewrites.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PHMLinear(nn.Module):
    """HyperNets' PHMLinear: parameters a (n, n, n), s (n, out/n, in/n), bias (out,)."""

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        self.a = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(n, n, n)))
        self.s = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(n, out_features // n,
                                                                  in_features // n)))
        self.bias = nn.Parameter(torch.zeros(out_features))

    @staticmethod
    def kronecker_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        res = a.unsqueeze(-1).unsqueeze(-3) * b.unsqueeze(-2).unsqueeze(-4)
        return res.reshape(res.shape[:-4] + (a.shape[-2] * b.shape[-2], a.shape[-1] * b.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.sum(self.kronecker_product(self.a, self.s), dim=0)
        return F.linear(x, weight=weight, bias=self.bias)


class PHMMLP(nn.Module):
    """A transformer-MLP-shaped stack of PHM layers: d -> 4d -> d, `depth` times, residual."""

    def __init__(self, n: int, d: int, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleList([PHMLinear(n, d, 4 * d), PHMLinear(n, 4 * d, d)])
                                    for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for up, down in self.blocks:
            x = x + down(F.gelu(up(x)))
        return x
