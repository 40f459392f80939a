"""One entry point for "residual add, then norm", whatever implementation runs it.

Every norm position of the model reduces to this pattern:

    s   = residual_scale * residual + x      (skipped when residual is None: s = x)
    out = norm(s) * out_scale                (RMSNorm or LayerNorm, statistics in fp32)

Pre-LN carries `s` on as the new residual stream and feeds `out` to the next
sublayer; Post-LN/DeepNorm keep only `out`; LNS passes out_scale = 1/sqrt(l).
The model calls `add_norm` only, so the placement logic is written once and the
implementation (`torch`, `triton`, `apex`) is a dispatch detail.
"""
from __future__ import annotations

import torch

from megatron_mixln.kernels.reference import KINDS, add_norm_torch

IMPLS = ("auto", "torch", "triton", "apex")


def resolve_impl(impl: str, device: torch.device) -> str:
    """`auto` means Triton on CUDA and PyTorch elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"norm_impl: unknown implementation {impl!r}; allowed: {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    return impl


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def add_norm(x, residual, weight, bias, eps, residual_scale=1.0, out_scale=1.0, kind="rmsnorm", impl="auto"):
    """Returns (normed, new_residual); new_residual is None when residual is None."""
    if kind not in KINDS:
        raise ValueError(f"add_norm: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    impl = resolve_impl(impl, x.device)
    if impl == "torch":
        return add_norm_torch(x, residual, weight, bias, eps, residual_scale, out_scale, kind)
    if impl == "triton":
        try:
            from megatron_mixln.kernels.triton_add_norm import add_norm_triton
        except ImportError as e:
            raise ImportError(f"--norm-impl triton needs the triton package (pip install triton): {e}") from e

        return add_norm_triton(x, residual, weight, bias, eps, residual_scale, out_scale, kind)
    from megatron_mixln.kernels.apex_add_norm import add_norm_apex

    return add_norm_apex(x, residual, weight, bias, eps, residual_scale, out_scale, kind)
