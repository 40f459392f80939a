"""The reference "residual add, then norm" (and the pointwise DyT/Derf kinds, and the reordered "norm, then
add") in plain PyTorch, and the output-dtype rule every implementation follows (megatron_mixln.kernels.add_norm dispatches between this one, Triton and apex)."""
from __future__ import annotations

import torch

STAT_KINDS = ("rmsnorm", "layernorm")  # normalise by statistics over the last dim
POINTWISE_KINDS = ("dyt", "derf")  # elementwise, no statistics
KINDS = STAT_KINDS + POINTWISE_KINDS


def add_norm_torch(x, residual, weight, bias, eps, residual_scale=1.0, out_scale=1.0, kind="rmsnorm",
                   alpha=None, shift=None):
    """Reference implementation in plain PyTorch (autograd does the backward).

    The sum is formed in fp32 (float64 stays float64: `wide`) and normalised before any rounding. Both outputs take
    `out_dtype(x, residual)`: x's dtype, or with a residual the promoted dtype of the two, as
    unfused `norm(x + residual)` would give -- so under autocast an fp32 residual stream stays
    fp32 when a bf16 sublayer output is added to it.
    """
    wide = torch.promote_types(x.dtype, torch.float32)
    if residual is None:
        s = x.to(wide)
    elif residual_scale != 1.0:
        s = x.to(wide) + residual.to(wide) * residual_scale
    elif torch.float32 in (x.dtype, residual.dtype):
        s = x + residual  # promotes to fp32 inside the add: the same sum, without an upcast copy
    else:
        s = x.to(wide) + residual.to(wide)
    if kind in POINTWISE_KINDS:
        y = pointwise(s, alpha, shift, kind)
    elif kind == "rmsnorm":
        y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mean = s.mean(-1, keepdim=True)
        c = s - mean
        y = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    y = y * weight.to(wide)
    if bias is not None:
        y = y + bias.to(wide)
    if out_scale != 1.0:
        y = y * out_scale
    dtype = out_dtype(x, residual)
    return y.to(dtype), (s.to(dtype) if residual is not None else None)


def pointwise(s: torch.Tensor, alpha: torch.Tensor, shift, kind: str) -> torch.Tensor:
    """tanh(alpha*s) (DyT) or erf(alpha*s + shift) (Derf) in s's (fp32 or wider) dtype; alpha/shift are
    1-element tensors."""
    wide = s.dtype
    if kind == "dyt":
        return torch.tanh(alpha.to(wide) * s)
    return torch.erf(alpha.to(wide) * s + shift.to(wide))


def norm_add_torch(x, residual, weight, bias, eps, kind="rmsnorm", alpha=None, shift=None):
    """residual + norm(x): the reordered (OLMo 2) pattern, the norm of a sublayer output x before its
    residual add. Returns (batch, seq, hidden) in the promoted dtype of x and residual; the norm's
    output is rounded to x's dtype first, as unfused `residual + norm(x)` would round it."""
    normed, _ = add_norm_torch(x, None, weight, bias, eps, kind=kind, alpha=alpha, shift=shift)
    return residual + normed


def out_dtype(x, residual) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
