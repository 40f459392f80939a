"""Autograd wrappers of zoo_kernels.py: `add_pointwise_triton` (DyT/Derf with the residual add) and
`norm_add_triton` (the reordered pattern, residual + norm(x)), the Triton paths behind `add_norm`/`norm_add`.

Saved for backward: the add's sum s (x itself without a residual) and the 1-element alpha/shift (pointwise);
x and the fp32 per-row rstd (and mean) (norm then add).
"""
from __future__ import annotations

import torch

from megatron_mixln.kernels import add_norm_kernels, zoo_kernels


def _rows(t):
    return t.reshape(-1, t.shape[-1]).contiguous()


class _AddPointwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, alpha, shift, residual_scale, out_scale, is_tanh):
        y, s = zoo_kernels.add_pointwise_fwd(_rows(x), None if residual is None else _rows(residual), weight.contiguous(),
                                             None if bias is None else bias.contiguous(), alpha, shift,
                                             residual_scale, out_scale, is_tanh)
        s = s.view(x.shape) if residual is not None else x
        ctx.save_for_backward(s, weight, alpha, shift if shift is not None else alpha)
        ctx.cfg = (residual is not None, bias is not None, shift is not None, residual_scale, out_scale, is_tanh)
        return y.view(x.shape), (s if residual is not None else None)

    @staticmethod
    def backward(ctx, dy, dres):
        s, weight, alpha, shift = ctx.saved_tensors
        has_res, has_bias, has_shift, a, c, is_tanh = ctx.cfg
        store_dr = has_res and a != 1.0
        dx, dr, dw, db, da, dsh = zoo_kernels.add_pointwise_bwd(
            _rows(dy), None if dres is None else _rows(dres), _rows(s), weight.contiguous(), alpha, shift,
            a, c, is_tanh, has_bias, store_dr)
        dx = dx.view(s.shape)
        grad_r = (dr.view(s.shape) if store_dr else dx) if has_res else None
        return (dx, grad_r, dw.to(weight.dtype), db.to(weight.dtype) if has_bias else None,
                da.to(alpha.dtype), dsh.to(shift.dtype) if has_shift else None, None, None, None)


class _NormAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms):
        y, rstd, mean = zoo_kernels.norm_add_fwd(_rows(x), _rows(residual), weight.contiguous(),
                                                 None if bias is None else bias.contiguous(), eps, is_rms)
        ctx.save_for_backward(x, weight, rstd, mean)
        ctx.cfg = (bias is not None, is_rms, residual.dtype)
        return y.view(torch.broadcast_shapes(x.shape, residual.shape))

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd, mean = ctx.saved_tensors
        has_bias, is_rms, r_dtype = ctx.cfg
        dx, _, dw, db = add_norm_kernels.add_norm_bwd(_rows(dy), None, _rows(x), weight.contiguous(), rstd, mean,
                                                      1.0, 1.0, is_rms, has_bias, False)
        return (dx.view(x.shape), dy.to(r_dtype), dw.to(weight.dtype), db.to(weight.dtype) if has_bias else None,
                None, None)


def add_pointwise_triton(x, residual, weight, bias, alpha, shift, residual_scale=1.0, out_scale=1.0, kind="dyt"):
    """(normed, new_residual or None) for kind dyt/derf, as add_norm_torch computes them."""
    return _AddPointwise.apply(x, residual, weight, bias, alpha, shift, float(residual_scale), float(out_scale),
                               kind == "dyt")


def norm_add_triton(x, residual, weight, bias, eps, kind="rmsnorm"):
    """residual + norm(x) for kind rmsnorm/layernorm, x and residual of the same shape."""
    return _NormAdd.apply(x, residual, weight, bias, float(eps), kind == "rmsnorm")
