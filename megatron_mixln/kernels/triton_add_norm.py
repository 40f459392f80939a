"""`add_norm` on the Triton kernels, registered as two custom ops with an autograd formula.

Why custom ops: `torch.compile` sees `mixln::add_norm_fwd` / `mixln::add_norm_bwd` as single opaque
nodes (their fake impls give the output shapes), so a compiled model traces straight through the
norms with no graph break, and AOTAutograd puts the backward op in the compiled backward graph.
We use `torch.library.custom_op` rather than `triton_op`: the kernel is already fused, so Inductor
has nothing to gain by looking inside it, and an opaque op also runs under the CPU interpreter,
which is how the compiled path is tested here.

Saved for backward: s (the sum, in x's dtype — it is the new residual, which the forward writes
anyway; when there is no residual s is x itself, so nothing extra is stored), the weight, and the
fp32 per-row rstd (and mean for LayerNorm): 4-8 bytes per row. The normalised ŝ is recomputed from
them, which costs no extra memory traffic since s is re-read for the statistics' gradient anyway.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron_mixln.kernels import add_norm_kernels as kernels
from megatron_mixln.kernels.reference import out_dtype


def _rows(t: Tensor) -> Tensor:
    """(..., N) -> contiguous (M, N); a copy only when t is not already contiguous."""
    return t.reshape(-1, t.shape[-1]).contiguous()


@torch.library.custom_op("mixln::add_norm_fwd", mutates_args=())
def add_norm_fwd(
    x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
    eps: float, residual_scale: float, out_scale: float, is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (normed, new_residual or an empty tensor, rstd fp32 (M,), mean fp32 (M,) or empty)."""
    y, s, rstd, mean = kernels.add_norm_fwd(
        _rows(x), None if residual is None else _rows(residual), weight.contiguous(),
        None if bias is None else bias.contiguous(), eps, residual_scale, out_scale, is_rms,
    )
    return y.view(x.shape), (s.view(x.shape) if residual is not None else s), rstd, mean


@add_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, residual_scale, out_scale, is_rms):
    m = x.numel() // x.shape[-1]
    stat = x.new_empty(m, dtype=torch.float32)
    dtype = out_dtype(x, residual)
    return (
        x.new_empty(x.shape, dtype=dtype),
        x.new_empty(x.shape, dtype=dtype) if residual is not None else x.new_empty(0),
        stat,
        stat.new_empty(0 if is_rms else m),
    )


@torch.library.custom_op("mixln::add_norm_bwd", mutates_args=())
def add_norm_bwd(
    dy: Tensor, dres: Optional[Tensor], s: Tensor, weight: Tensor, rstd: Tensor, mean: Tensor,
    residual_scale: float, out_scale: float, is_rms: bool, has_bias: bool, store_dr: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_s in s's dtype, residual_scale*grad_s or empty, dw fp32, db fp32 or empty)."""
    dx, dr, dw, db = kernels.add_norm_bwd(
        _rows(dy), None if dres is None else _rows(dres), _rows(s), weight.contiguous(), rstd, mean,
        residual_scale, out_scale, is_rms, has_bias, store_dr,
    )
    return dx.view(s.shape), (dr.view(s.shape) if store_dr else dr), dw, db


@add_norm_bwd.register_fake
def _(dy, dres, s, weight, rstd, mean, residual_scale, out_scale, is_rms, has_bias, store_dr):
    n = s.shape[-1]
    return (
        s.new_empty(s.shape),
        s.new_empty(s.shape) if store_dr else s.new_empty(0),
        weight.new_empty(n, dtype=torch.float32),
        weight.new_empty(n if has_bias else 0, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, residual_scale, out_scale, is_rms = inputs
    _y, s, rstd, mean = output
    ctx.save_for_backward(s if residual is not None else x, weight, rstd, mean)
    ctx.residual_scale, ctx.out_scale, ctx.is_rms = residual_scale, out_scale, is_rms
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(rstd, mean)
    ctx.set_materialize_grads(False)  # Post-LN drops new_residual: its grad is None, not a zero tensor


def _backward(ctx, dy, dres, _drstd, _dmean):
    s, weight, rstd, mean = ctx.saved_tensors
    has_residual = ctx.residual_dtype is not None
    if dy is None:
        dy = torch.zeros_like(s)
    # dr = a*ds needs its own tensor only when a != 1; otherwise dx serves both inputs.
    store_dr = has_residual and ctx.residual_scale != 1.0
    dx, dr, dw, db = torch.ops.mixln.add_norm_bwd(
        dy, dres if has_residual else None, s, weight, rstd, mean,
        ctx.residual_scale, ctx.out_scale, ctx.is_rms, ctx.bias_dtype is not None, store_dr,
    )
    d_residual = None
    if has_residual:
        d_residual = (dr if store_dr else dx).to(ctx.residual_dtype)
    d_bias = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dx, d_residual, dw.to(weight.dtype), d_bias, None, None, None, None


add_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def interpreted() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels._add_norm_fwd_kernel, InterpretedFunction)


def _check_inputs(x, residual, weight, bias, kind):
    if kind not in ("rmsnorm", "layernorm"):
        raise ValueError(f"add_norm: unknown kind {kind!r}; allowed: rmsnorm, layernorm")
    if x.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"--norm-impl triton needs CUDA tensors, got a {x.device.type} tensor. On CPU use "
            "--norm-impl torch (or auto), or set TRITON_INTERPRET=1 before triton is first imported "
            "to run the kernels in Triton's (slow) interpreter."
        )
    n = x.shape[-1]
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"add_norm: weight/bias must have shape ({n},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")


def add_norm_triton(x, residual, weight, bias, eps, residual_scale=1.0, out_scale=1.0, kind="rmsnorm"):
    """Same contract as `add_norm_torch`: returns (normed, new_residual or None)."""
    _check_inputs(x, residual, weight, bias, kind)
    y, s, _, _ = torch.ops.mixln.add_norm_fwd(
        x, residual, weight, bias, float(eps), float(residual_scale), float(out_scale), kind == "rmsnorm"
    )
    return y, (s if residual is not None else None)
