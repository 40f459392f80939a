"""The norms: RMSNorm / LayerNorm (statistics in fp32) or the pointwise DyT / Derf, fused with the add
around them; and QKNorm, the norm of a q/k/v projection (per head or over the whole projection)."""
from __future__ import annotations

import torch
from torch import nn

from megatron_mixln.kernels.add_norm import POINTWISE_KINDS, add_norm, norm_add, pointwise


class Norm(nn.Module):
    """RMSNorm (default), LayerNorm, DyT or Derf over the last dimension.

    `norm(x)` returns the normalised tensor. `norm(x, residual=r, residual_scale=a)`
    normalises `a*r + x` and returns `(normed, a*r + x)`, so the residual add and the
    norm after it run as one (possibly fused) op; `norm.then_add(x, r)` returns `r + norm(x)`
    (the reordered/OLMo 2 pattern). The call always goes through `__call__` (or a method that
    itself calls a hooked submodule-free kernel) so that module hooks (ZeRO-3 gathering) see it.

    Parameters: `weight` (γ, dim); `bias` (β, dim: LayerNorm, Derf, DyT with `bias=True`); the
    pointwise kinds add `alpha` (α, shape (1,), a learnable scalar per norm site, initialised to
    `alpha_init`) and Derf `shift` (s, shape (1,), initialised to 0).
    """

    def __init__(self, dim: int, kind: str = "rmsnorm", eps: float = 1e-6, impl: str = "auto",
                 alpha_init: float = 1.0, bias: bool | None = None):
        super().__init__()
        self.kind, self.eps, self.impl, self.alpha_init = kind, eps, impl, alpha_init
        self.weight = nn.Parameter(torch.ones(dim))
        has_bias = kind in ("layernorm", "derf") if bias is None else bias
        self.bias = nn.Parameter(torch.zeros(dim)) if has_bias else None
        pointwise = kind in POINTWISE_KINDS
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init))) if pointwise else None
        self.shift = nn.Parameter(torch.zeros(1)) if kind == "derf" else None

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        for p in (self.bias, self.shift):
            if p is not None:
                nn.init.zeros_(p)
        if self.alpha is not None:
            nn.init.constant_(self.alpha, self.alpha_init)

    def forward(self, x, residual=None, residual_scale: float = 1.0, out_scale: float = 1.0):
        out, new_residual = add_norm(x, residual, self.weight, self.bias, self.eps, residual_scale, out_scale,
                                     self.kind, self.impl, self.alpha, self.shift)
        return out if residual is None else (out, new_residual)

    def then_add(self, x, residual):
        """residual + norm(x): x (batch, seq, hidden) a sublayer output, residual the stream it joins."""
        return norm_add(x, residual, self.weight, self.bias, self.eps, self.kind, self.impl, self.alpha, self.shift)

    def extra_repr(self):
        alpha = f", alpha_init={self.alpha_init}" if self.alpha is not None else ""
        return f"{self.weight.shape[0]}, kind={self.kind}, eps={self.eps}, impl={self.impl}{alpha}"


def make_norm(config, site: str) -> Norm:
    """A residual-stream norm of `config`'s (ModelConfig) kind; `site` ('attn', 'ffn', 'final') picks DyT/Derf's
    initial alpha (--dyt-alpha-init)."""
    alpha = dict(zip(("attn", "ffn", "final"), config.dyt_alpha_inits))[site]
    return Norm(config.hidden_size, config.norm_kind, config.norm_epsilon, config.norm_impl, alpha,
                bias=True if config.dyt_bias else None)


class QKNorm(nn.Module):
    """The norm of a q, k or v projection output, before RoPE.

    mode "head": over each head's head_dim (Qwen3, Gemma 3, Megatron-core --qk-layernorm; HybridNorm's
    q/k/v norms), one gain of size head_dim shared by all heads, or one per head (`per_head_gain`,
    shape (num_heads, head_dim), Cohere-style).
    mode "full": over the whole projection num_heads*head_dim, gain of that size (OLMo 2's q_norm/k_norm).
    Pointwise kinds (DyT/Derf) have no statistics; their α (and s) are scalars per norm.

    Under tensor parallelism each rank holds `local_heads` of the heads (`shard(...)` sets the slice):
    every parameter stays whole on every rank and the rank uses its heads' slice of the gain, so
    each rank's gradient covers its heads only and is summed over the TP group (the parameters are
    marked `sequence_parallel`, the attribute read by the TP-sum hooks). In "full" mode the
    statistics are summed over the TP group (one all-reduce, whose backward is an all-reduce too),
    so the function equals the TP=1 one.
    """

    def __init__(self, num_heads: int, head_dim: int, mode: str, kind: str = "rmsnorm", eps: float = 1e-6,
                 per_head_gain: bool = False, alpha_init: float = 1.0, bias: bool | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.mode, self.kind, self.eps = num_heads, head_dim, mode, kind, eps
        self.alpha_init = alpha_init
        shape = (num_heads * head_dim,) if mode == "full" else (num_heads, head_dim) if per_head_gain else (head_dim,)
        self.weight = nn.Parameter(torch.ones(shape))
        has_bias = kind in ("layernorm", "derf") if bias is None else bias
        self.bias = nn.Parameter(torch.zeros(shape)) if has_bias else None
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init))) if kind in POINTWISE_KINDS else None
        self.shift = nn.Parameter(torch.zeros(1)) if kind == "derf" else None
        self.tp_rank, self.tp_size, self.sum_over_tp = 0, 1, None

    reset_parameters = Norm.reset_parameters

    def shard(self, tp_rank: int, tp_size: int, sum_over_tp) -> None:
        """Use heads [rank*H/tp, (rank+1)*H/tp) of the gain; `sum_over_tp(t)`: the all-reduce (forward
        and backward) that turns this rank's "full" statistics into the whole projection's."""
        if self.num_heads % tp_size:
            raise ValueError(f"QKNorm: {self.num_heads} heads are not divisible by TP={tp_size}")
        self.tp_rank, self.tp_size, self.sum_over_tp = tp_rank, tp_size, sum_over_tp

    def _local(self, p):
        """This rank's slice of a gain/bias, shaped to broadcast over (batch, seq, local_heads, head_dim)."""
        if p is None:
            return None
        if p.dim() == 1 and self.mode == "head":
            return p
        heads = p.view(self.tp_size, self.num_heads // self.tp_size, self.head_dim)[self.tp_rank]
        return heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, local_heads*head_dim) -> same shape and dtype."""
        shape, dtype = x.shape, x.dtype
        wide = torch.promote_types(dtype, torch.float32)  # fp32 statistics (float64 stays float64)
        s = x.to(wide).view(*shape[:-1], -1, self.head_dim)  # (batch, seq, local_heads, head_dim)
        if self.kind in POINTWISE_KINDS:
            y = pointwise(s, self.alpha, self.shift, self.kind)
        else:
            dims = (-2, -1) if self.mode == "full" else (-1,)
            count = s.shape[-1] * (s.shape[-2] * self.tp_size if self.mode == "full" else 1)
            if self.kind == "layernorm":
                s = s - self._total(s.sum(dims, keepdim=True)) / count
            y = s * torch.rsqrt(self._total(s.pow(2).sum(dims, keepdim=True)) / count + self.eps)
        y = y * self._local(self.weight).to(wide)
        if self.bias is not None:
            y = y + self._local(self.bias).to(wide)
        return y.reshape(shape).to(dtype)

    def _total(self, local_sum: torch.Tensor) -> torch.Tensor:
        """A per-token sum over this rank's heads -> the sum over all heads ("full" under TP)."""
        if self.mode != "full" or self.tp_size == 1:
            return local_sum
        return self.sum_over_tp(local_sum)

    def extra_repr(self):
        tp = f", tp={self.tp_rank}/{self.tp_size}" if self.tp_size > 1 else ""
        return f"mode={self.mode}, gain={tuple(self.weight.shape)}, kind={self.kind}, eps={self.eps}{tp}"
