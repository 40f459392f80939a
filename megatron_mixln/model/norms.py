"""RMSNorm / LayerNorm whose statistics are computed in fp32, fused with the add before it."""
from __future__ import annotations

import torch
from torch import nn

from megatron_mixln.kernels.add_norm import add_norm


class Norm(nn.Module):
    """RMSNorm (default) or LayerNorm over the last dimension.

    `norm(x)` returns the normalised tensor. `norm(x, residual=r, residual_scale=a)`
    normalises `a*r + x` and returns `(normed, a*r + x)`, so the residual add and the
    norm after it run as one (possibly fused) op. The call always goes through
    `__call__` so that module hooks (ZeRO-3 parameter gathering) see it.
    """

    def __init__(self, dim: int, kind: str = "rmsnorm", eps: float = 1e-6, impl: str = "auto"):
        super().__init__()
        self.kind, self.eps, self.impl = kind, eps, impl
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, residual=None, residual_scale: float = 1.0, out_scale: float = 1.0):
        out, new_residual = add_norm(
            x, residual, self.weight, self.bias, self.eps, residual_scale, out_scale, self.kind, self.impl
        )
        return out if residual is None else (out, new_residual)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, kind={self.kind}, eps={self.eps}, impl={self.impl}"
