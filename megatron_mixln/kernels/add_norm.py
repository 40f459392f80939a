"""One entry point for "residual add, then norm", whatever implementation runs it.

Every norm position of the model reduces to this pattern:

    s   = residual_scale * residual + x      (skipped when residual is None: s = x)
    out = norm(s) * out_scale                (RMSNorm or LayerNorm, statistics in fp32)

Pre-LN carries `s` on as the new residual stream and feeds `out` to the next
sublayer; Post-LN/DeepNorm keep only `out`; LNS passes out_scale = 1/sqrt(l).
The model calls `add_norm` only, so the placement logic is written once and the
implementation (`torch`, `triton`, `apex`) is a dispatch detail.

The pointwise kinds replace the statistics by an elementwise squashing (no reduction over the
hidden dimension at all), with a learnable scalar `alpha` (and `shift` for Derf):

    dyt:  out = weight * tanh(alpha * s) (+ bias)        DyT, arXiv 2503.10622 Eq. 1
    derf: out = weight * erf(alpha * s + shift) + bias   Derf, arXiv 2512.10938

The reordered (OLMo 2) pattern "norm the sublayer output, then add" is `norm_add` below.
"""
from __future__ import annotations

import torch

IMPLS = ("auto", "torch", "triton", "apex")
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


def resolve_impl(impl: str, device: torch.device, kind: str = "rmsnorm") -> str:
    """`auto` means Triton on CUDA and PyTorch elsewhere (pointwise kinds: no apex, see POINTWISE_IMPLS)."""
    if impl not in IMPLS:
        raise ValueError(f"norm_impl: unknown implementation {impl!r}; allowed: {', '.join(IMPLS)}")
    if kind in POINTWISE_KINDS and impl not in POINTWISE_IMPLS:
        raise ValueError(f"norm_impl: {impl!r} has no {kind} kernel; allowed with it: {', '.join(POINTWISE_IMPLS)}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    return impl


POINTWISE_IMPLS = ("auto", "torch", "triton")  # implementations that have the DyT/Derf kinds


def norm_add(x, residual, weight, bias, eps, kind="rmsnorm", impl="auto", alpha=None, shift=None):
    """residual + norm(x) (reordered/OLMo 2 pattern); x, residual: (..., hidden)."""
    if kind not in KINDS:
        raise ValueError(f"norm_add: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    impl = resolve_impl(impl, x.device, kind)
    if impl == "torch":
        return norm_add_torch(x, residual, weight, bias, eps, kind, alpha, shift)
    if impl == "triton" and kind in STAT_KINDS and x.shape == residual.shape:
        from megatron_mixln.kernels.triton_zoo import norm_add_triton

        return norm_add_triton(x, residual, weight, bias, eps, kind)  # one kernel: norm, gain, add
    return residual + add_norm(x, None, weight, bias, eps, kind=kind, impl=impl, alpha=alpha, shift=shift)[0]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def add_norm(x, residual, weight, bias, eps, residual_scale=1.0, out_scale=1.0, kind="rmsnorm", impl="auto",
             alpha=None, shift=None):
    """Returns (normed, new_residual); new_residual is None when residual is None.
    `alpha` (and `shift` for derf): the 1-element scalars of the pointwise kinds, None otherwise."""
    if kind not in KINDS:
        raise ValueError(f"add_norm: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    impl = resolve_impl(impl, x.device, kind)
    if impl == "torch":
        return add_norm_torch(x, residual, weight, bias, eps, residual_scale, out_scale, kind, alpha, shift)
    if impl == "triton":
        try:
            from megatron_mixln.kernels.triton_add_norm import add_norm_triton
            from megatron_mixln.kernels.triton_zoo import add_pointwise_triton
        except ImportError as e:
            raise ImportError(f"--norm-impl triton needs the triton package (pip install triton): {e}") from e

        if kind in POINTWISE_KINDS:
            return add_pointwise_triton(x, residual, weight, bias, alpha, shift, residual_scale, out_scale, kind)
        return add_norm_triton(x, residual, weight, bias, eps, residual_scale, out_scale, kind)
    from megatron_mixln.kernels.apex_add_norm import add_norm_apex

    return add_norm_apex(x, residual, weight, bias, eps, residual_scale, out_scale, kind)
