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

from megatron_mixln.kernels.reference import (  # noqa: F401  (re-exported: the model imports them from here)
    KINDS, POINTWISE_KINDS, STAT_KINDS, add_norm_torch, norm_add_torch, out_dtype, pointwise,
)

IMPLS = ("auto", "torch", "triton", "apex")


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
