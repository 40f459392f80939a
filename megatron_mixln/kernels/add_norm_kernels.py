"""Triton kernels for fused residual-add + RMSNorm/LayerNorm, and the plain functions that launch them.

No autograd here: `triton_add_norm.py` wraps these launchers into custom ops with a backward.

    forward :  s = a*r + x ;  y = (norm(s) * w + b) * c        (a = residual_scale, c = out_scale)
    backward:  g = c*dy ;  ŝ = norm(s)  ;  dw = Σ_rows g*ŝ ;  db = Σ_rows g
               ds = rstd * (w*g - ŝ*mean(ŝ*w*g) [- mean(w*g) for LayerNorm]) + d(new_residual)
               dx = ds ;  dr = a*ds

All arithmetic is fp32 whatever the storage dtype. The forward stores s (rounded to x's dtype: it is
the new residual the model carries on anyway) and the per-row rstd (and mean for LayerNorm); the
backward re-normalises s from those instead of keeping ŝ, so no extra activation is written.

Every tensor is 2-D, contiguous, (rows, N); each program owns a [BLOCK_M, BLOCK_N] tile of whole
rows (BLOCK_N = next power of two >= N, masked), so the statistics never leave registers.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from megatron_mixln.kernels.reference import out_dtype

MAX_FUSED_N = 65536  # a row must fit in one program's registers


@triton.jit
def normalise_rows(x, mask, row_ok, rows, N, eps, RSTD, MEAN, IS_RMS: tl.constexpr):
    """x̂ of a [BLOCK_M, BLOCK_N] fp32 tile of whole rows (masked columns hold 0); stores each row's
    rstd (and mean for LayerNorm) for the backward. Shared by every forward kernel that normalises."""
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        x_hat = x * rstd[:, None]
    else:
        mean = tl.sum(x, axis=1) / N
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
        x_hat = centred * rstd[:, None]
        tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    return x_hat


@triton.jit
def _add_norm_fwd_kernel(
    X, R, W, B, Y, S, RSTD, MEAN,
    M, N, eps, residual_scale, out_scale,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]  # int64: rows*N can pass 2**31

    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        s = s + r * residual_scale
        tl.store(S + offs, s.to(S.dtype.element_ty), mask=mask)  # the new residual stream

    s_hat = normalise_rows(s, mask, row_ok, rows, N, eps, RSTD, MEAN, IS_RMS)

    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = s_hat * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = y * out_scale
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_bwd_kernel(
    DY, DRES, S, W, RSTD, MEAN, DX, DR, DW_PARTIAL, DB_PARTIAL,
    M, N, rows_per_program, residual_scale, out_scale,
    IS_RMS: tl.constexpr, HAS_DRES: tl.constexpr, STORE_DR: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Each program walks a contiguous block of rows and keeps its share of dw/db in registers; it
    # writes one row of the (programs, N) fp32 partial buffers at the end. Summing those rows is a
    # second, tiny reduction. This avoids atomics on a single N-vector, which every program would
    # hit at once (contention, and a non-deterministic summation order).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)

    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]

        g = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32) * out_scale
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            s_hat = s * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            s_hat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        wg = g * w[None, :]
        c1 = tl.sum(s_hat * wg, axis=1) / N
        if IS_RMS:
            ds = (wg - s_hat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wg, axis=1) / N
            ds = (wg - s_hat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DRES:  # Pre-LN: the carried sum is also used downstream
            ds += tl.load(DRES + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, ds.to(DX.dtype.element_ty), mask=mask)
        if STORE_DR:  # only when a != 1; otherwise the caller reuses dx as the residual's grad
            tl.store(DR + offs, (ds * residual_scale).to(DR.dtype.element_ty), mask=mask)

        dw_acc += tl.sum(g * s_hat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(g, axis=0)

    tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db_acc, mask=col_ok)


def launch_config(n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for rows of n elements: small rows are packed several to a program (a
    tile of ~4k elements) so that each program still moves enough bytes."""
    if n > MAX_FUSED_N:
        raise ValueError(f"add_norm (triton): hidden size {n} > {MAX_FUSED_N} does not fit one program")
    block_n = triton.next_power_of_2(n)
    return max(1, min(16, 4096 // block_n)), block_n


def num_warps(block_m: int, block_n: int) -> int:
    """num_warps of both kernels for a [block_m, block_n] tile: each thread gets ~8 elements (2 to
    32 warps). ptxas for sm_90 puts the backward at ~6 registers per element (fp32 dy, s, ŝ, w·dy,
    ds and the dw partial; tests/kernels/compile_sm90.py prints registers and spills per config).

    A pure function of the shape, deliberately not timed by Triton's autotuner: the row reductions'
    summation order depends on num_warps, and a timing-based pick differs between processes. Under
    tensor parallelism without sequence parallelism every TP rank normalises the same replicated
    rows and updates its replicated norm weights from its own dW, so those ranks must run the same
    configuration to stay bitwise identical (and a resumed run must reproduce the same numbers)."""
    return max(2, min(32, block_m * block_n // (8 * 32)))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def backward_programs(m: int, block_m: int, device: torch.device) -> int:
    """How many programs share the backward: two per SM, but each with at least 32 rows, because
    the (programs, N) fp32 partials are written and read once more: 8·P·N bytes against 8·M·N for
    the bf16 tensors, i.e. P/M of the traffic (3% at 4k tokens, 0.4% at 64k). Under the CPU
    interpreter at most 4, so that the multi-program path and the partial sums are exercised."""
    tiles = triton.cdiv(m, block_m)
    if device.type != "cuda":
        return max(1, min(4, tiles))
    return max(1, min(2 * _num_sms(device.index or 0), triton.cdiv(m, 32), tiles))


def add_norm_fwd(x, residual, weight, bias, eps, residual_scale, out_scale, is_rms):
    """x, residual: (M, N) contiguous. Returns y, s (empty when residual is None), rstd, mean
    (empty for RMSNorm); rstd and mean are fp32 of shape (M,)."""
    m, n = x.shape
    block_m, block_n = launch_config(n)
    dtype = out_dtype(x, residual)
    y = torch.empty_like(x, dtype=dtype)
    s = torch.empty_like(x, dtype=dtype) if residual is not None else x.new_empty(0)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    mean = torch.empty(m if not is_rms else 0, device=x.device, dtype=torch.float32)
    if m:
        _add_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
            x, residual if residual is not None else x, weight, bias if bias is not None else weight,
            y, s if residual is not None else y, rstd, mean if not is_rms else rstd,
            m, n, eps, residual_scale, out_scale,
            IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m, block_n),
        )
    return y, s, rstd, mean


def add_norm_bwd(dy, dres, s, weight, rstd, mean, residual_scale, out_scale, is_rms, has_bias, store_dr):
    """dy, dres (or None), s: (M, N) contiguous. Returns dx, dr (empty unless store_dr), dw, db
    (empty unless has_bias); dw and db are fp32, reduced over the rows."""
    m, n = dy.shape
    block_m, block_n = launch_config(n)
    programs = backward_programs(m, block_m, dy.device)
    rows_per_program = max(1, triton.cdiv(triton.cdiv(m, programs), block_m)) * block_m  # whole tiles
    programs = max(1, triton.cdiv(m, rows_per_program))
    dx = torch.empty_like(dy, dtype=s.dtype)
    dr = torch.empty_like(dx) if store_dr else dx.new_empty(0)
    dw_partial = torch.empty(programs, n, device=dy.device, dtype=torch.float32)
    db_partial = torch.empty(programs if has_bias else 0, n, device=dy.device, dtype=torch.float32)
    if m:
        _add_norm_bwd_kernel[(programs,)](
            dy, dres if dres is not None else dy, s, weight, rstd, mean if not is_rms else rstd,
            dx, dr if store_dr else dx, dw_partial, db_partial if has_bias else dw_partial,
            m, n, rows_per_program, residual_scale, out_scale,
            IS_RMS=is_rms, HAS_DRES=dres is not None, STORE_DR=store_dr, HAS_BIAS=has_bias,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m, block_n),
        )
    else:
        dw_partial.zero_()
        db_partial.zero_()
    return dx, dr, dw_partial.sum(0), db_partial.sum(0) if has_bias else dw_partial.new_empty(0)
