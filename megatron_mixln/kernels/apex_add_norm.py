"""`add_norm` on NVIDIA apex's fused RMSNorm/LayerNorm (where a cluster has apex built).

apex fuses only the norm, so the residual add and the scales run in PyTorch around it. To keep
the contract of `add_norm_torch` (the norm sees the fp32 sum, the weight is applied in fp32, one
rounding at the end) apex is called on fp32 input and an fp32 view of the weight; this costs an
fp32 round trip, so this path is a baseline for comparison, not the fast one (that is Triton's).
"""
from __future__ import annotations

import torch

from megatron_mixln.kernels.reference import out_dtype

INSTALL_HINT = (
    "--norm-impl apex needs NVIDIA apex built with its CUDA extensions "
    "(git clone https://github.com/NVIDIA/apex && cd apex && "
    'pip install -v --no-build-isolation --config-settings "--build-option=--cpp_ext" '
    '--config-settings "--build-option=--cuda_ext" .); note the PyPI package named "apex" is an '
    "unrelated project. Or use --norm-impl triton (the fused kernels of this project) or torch."
)


def _apex_norms():
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from e
    return fused_rms_norm_affine, fused_layer_norm_affine


def add_norm_apex(x, residual, weight, bias, eps, residual_scale=1.0, out_scale=1.0, kind="rmsnorm"):
    """Same contract as `add_norm_torch`: returns (normed, new_residual or None)."""
    rms_norm, layer_norm = _apex_norms()
    s = x.float()
    if residual is not None:
        s = s + residual.float() * residual_scale
    shape = (x.shape[-1],)
    if kind == "rmsnorm":
        y = rms_norm(s, weight.float(), shape, eps=eps)
    else:
        y = layer_norm(s, weight.float(), bias.float(), shape, eps=eps)
    if out_scale != 1.0:
        y = y * out_scale
    dtype = out_dtype(x, residual)
    return y.to(dtype), (s.to(dtype) if residual is not None else None)
