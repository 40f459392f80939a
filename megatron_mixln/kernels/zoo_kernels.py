"""Triton kernels for the norm zoo's two fused patterns, beside add_norm_kernels.py (same tiling and launch rules).

    add + pointwise norm (DyT / Derf, arXiv 2503.10622 / 2512.10938):
        forward :  s = a*r + x ;  u = alpha*s + shift ;  y = (f(u) * w + b) * c      f = tanh | erf
        backward:  g = c*dy ;  f' = 1 - tanh(u)^2 | 2/sqrt(pi) * exp(-u^2)
                   ds = g*w*f'*alpha + d(new_residual) ;  dx = ds ;  dr = a*ds
                   dw = Σ g*f(u) ;  db = Σ g ;  dalpha = Σ g*w*f'*s ;  dshift = Σ g*w*f'
    norm then add (the reordered / OLMo 2 pattern):
        forward :  y = r + norm(x)*w + b             (r the residual stream, x the sublayer output)
        backward:  dr = dy ;  dx, dw, db = the add_norm backward of dy with no residual

All arithmetic is fp32. The pointwise backward keeps its row-tile partials of dw/db (one (programs, N)
row each) and of dalpha/dshift (one number per program), summed afterwards: no atomics, a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_mixln.kernels.reference import out_dtype
from megatron_mixln.kernels.add_norm_kernels import backward_programs, launch_config, normalise_rows, num_warps


@triton.jit
def _squash(u, IS_TANH: tl.constexpr):
    if IS_TANH:
        return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)  # tanh(u), overflow-safe at both ends
    return tl.math.erf(u)


@triton.jit
def _add_pointwise_fwd_kernel(
    X, R, W, B, ALPHA, SHIFT, Y, S,
    M, N, residual_scale, out_scale,
    IS_TANH: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s = s + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32) * residual_scale
        tl.store(S + offs, s.to(S.dtype.element_ty), mask=mask)
    u = s * tl.load(ALPHA).to(tl.float32)
    if not IS_TANH:
        u = u + tl.load(SHIFT).to(tl.float32)
    y = _squash(u, IS_TANH) * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, (y * out_scale).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_pointwise_bwd_kernel(
    DY, DRES, S, W, ALPHA, SHIFT, DX, DR, DW_PARTIAL, DB_PARTIAL, DALPHA_PARTIAL, DSHIFT_PARTIAL,
    M, N, rows_per_program, residual_scale, out_scale,
    IS_TANH: tl.constexpr, HAS_DRES: tl.constexpr, STORE_DR: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    alpha = tl.load(ALPHA).to(tl.float32)
    shift = 0.0
    if not IS_TANH:
        shift = tl.load(SHIFT).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    da_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    dsh_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        g = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32) * out_scale
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        u = alpha * s + shift
        f = _squash(u, IS_TANH)
        if IS_TANH:
            df = 1.0 - f * f
        else:
            df = 1.1283791670955126 * tl.exp(-u * u)  # 2/sqrt(pi) exp(-u^2)
        gwdf = tl.where(mask, g * w[None, :] * df, 0.0)
        ds = gwdf * alpha
        if HAS_DRES:
            ds += tl.load(DRES + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, ds.to(DX.dtype.element_ty), mask=mask)
        if STORE_DR:
            tl.store(DR + offs, (ds * residual_scale).to(DR.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(g * f, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(g, axis=0)
        da_acc += tl.sum(gwdf * s, axis=0)
        dsh_acc += tl.sum(gwdf, axis=0)
    tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db_acc, mask=col_ok)
    tl.store(DALPHA_PARTIAL + pid, tl.sum(da_acc, axis=0))
    tl.store(DSHIFT_PARTIAL + pid, tl.sum(dsh_acc, axis=0))


@triton.jit
def _norm_add_fwd_kernel(
    X, R, W, B, Y, RSTD, MEAN, M, N, eps,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x_hat = normalise_rows(x, mask, row_ok, rows, N, eps, RSTD, MEAN, IS_RMS)
    y = x_hat * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def add_pointwise_fwd(x, residual, weight, bias, alpha, shift, residual_scale, out_scale, is_tanh):
    """x, residual: (M, N) contiguous -> y, s (empty when residual is None)."""
    m, n = x.shape
    block_m, block_n = launch_config(n)
    dtype = out_dtype(x, residual)
    y = torch.empty_like(x, dtype=dtype)
    s = torch.empty_like(x, dtype=dtype) if residual is not None else x.new_empty(0)
    if m:
        _add_pointwise_fwd_kernel[(triton.cdiv(m, block_m),)](
            x, residual if residual is not None else x, weight, bias if bias is not None else weight,
            alpha, shift if shift is not None else alpha, y, s if residual is not None else y,
            m, n, residual_scale, out_scale,
            IS_TANH=is_tanh, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m, block_n))
    return y, s


def add_pointwise_bwd(dy, dres, s, weight, alpha, shift, residual_scale, out_scale, is_tanh, has_bias, store_dr):
    """-> dx, dr (empty unless store_dr), dw, db (empty unless has_bias), dalpha (1,), dshift (1,); fp32 reductions."""
    m, n = dy.shape
    block_m, block_n = launch_config(n)
    programs = backward_programs(m, block_m, dy.device)
    rows_per_program = max(1, triton.cdiv(triton.cdiv(m, programs), block_m)) * block_m
    programs = max(1, triton.cdiv(m, rows_per_program))
    dx = torch.empty_like(dy, dtype=s.dtype)
    dr = torch.empty_like(dx) if store_dr else dx.new_empty(0)
    f32 = dict(device=dy.device, dtype=torch.float32)
    dw_p, db_p = torch.zeros(programs, n, **f32), torch.zeros(programs if has_bias else 0, n, **f32)
    da_p, dsh_p = torch.zeros(programs, **f32), torch.zeros(programs, **f32)
    if m:
        _add_pointwise_bwd_kernel[(programs,)](
            dy, dres if dres is not None else dy, s, weight, alpha, shift if shift is not None else alpha,
            dx, dr if store_dr else dx, dw_p, db_p if has_bias else dw_p, da_p, dsh_p,
            m, n, rows_per_program, residual_scale, out_scale,
            IS_TANH=is_tanh, HAS_DRES=dres is not None, STORE_DR=store_dr, HAS_BIAS=has_bias,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m, block_n))
    return dx, dr, dw_p.sum(0), (db_p.sum(0) if has_bias else dw_p.new_empty(0)), da_p.sum().view(1), dsh_p.sum().view(1)


def norm_add_fwd(x, residual, weight, bias, eps, is_rms):
    """y = residual + norm(x): (M, N) contiguous -> y (promoted dtype), rstd, mean (fp32 (M,), mean empty for RMS)."""
    m, n = x.shape
    block_m, block_n = launch_config(n)
    y = torch.empty_like(x, dtype=out_dtype(x, residual))
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    mean = torch.empty(m if not is_rms else 0, device=x.device, dtype=torch.float32)
    if m:
        _norm_add_fwd_kernel[(triton.cdiv(m, block_m),)](
            x, residual, weight, bias if bias is not None else weight, y, rstd, mean if not is_rms else rstd,
            m, n, eps, IS_RMS=is_rms, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m, block_n))
    return y, rstd, mean
