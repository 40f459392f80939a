"""The reference "residual add, then norm" in plain PyTorch, and the output-dtype rule every implementation
follows (megatron_mixln.kernels.add_norm dispatches between this one, Triton and apex)."""
from __future__ import annotations

import torch

KINDS = ("rmsnorm", "layernorm")


def add_norm_torch(x, residual, weight, bias, eps, residual_scale=1.0, out_scale=1.0, kind="rmsnorm"):
    """Reference implementation in plain PyTorch (autograd does the backward).

    The sum is formed in fp32 and normalised before any rounding. Both outputs take
    `out_dtype(x, residual)`: x's dtype, or with a residual the promoted dtype of the two, as
    unfused `norm(x + residual)` would give -- so under autocast an fp32 residual stream stays
    fp32 when a bf16 sublayer output is added to it.
    """
    if residual is None:
        s = x.float()
    elif residual_scale != 1.0:
        s = x.float() + residual.float() * residual_scale
    elif torch.float32 in (x.dtype, residual.dtype):
        s = x + residual  # promotes to fp32 inside the add: the same sum, without an upcast copy
    else:
        s = x.float() + residual.float()
    if kind == "rmsnorm":
        y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mean = s.mean(-1, keepdim=True)
        c = s - mean
        y = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    if out_scale != 1.0:
        y = y * out_scale
    dtype = out_dtype(x, residual)
    return y.to(dtype), (s.to(dtype) if residual is not None else None)


def out_dtype(x, residual) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
