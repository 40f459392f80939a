"""Causal self-attention with RoPE and optional grouped-query heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_cos_sin(seq_len: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (seq_len, head_dim) in fp32, "rotate-half" layout as in HF LLaMA.

    Computed on the fly (a few KFLOPs) rather than stored as buffers, so that models built
    on the meta device or split into pipeline stages need nothing re-initialised.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); computed in fp32 (the fp32 tables promote a bf16 x inside
    the multiplications, so no separate upcast copies of x are made), returned in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """q/k/v/o projections, bias-free as LLaMA's unless `qkv_bias` (q, k, v) / `out_bias` (o). Head counts are
    read from the projection shapes in forward, so tensor parallelism can swap in sharded linears without
    touching this code.

    Optional `q_norm`, `k_norm`, `v_norm` (QKNorm modules, HF's names) normalise the projection
    outputs before RoPE: QK-norm (Qwen3 per head, OLMo 2 over the whole projection) and HybridNorm's
    QKV-norm."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, rotary_base: float,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, v_norm: nn.Module | None = None,
                 qkv_bias: bool = False, out_bias: bool = False):
        super().__init__()
        self.q_norm, self.k_norm, self.v_norm = q_norm, k_norm, v_norm
        self.head_dim = hidden_size // num_heads
        self.rotary_base = rotary_base
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        batch, seq = q.shape[0], q.shape[1]
        q = q.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(seq, self.head_dim, self.rotary_base, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
