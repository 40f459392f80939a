"""Independent, deliberately naive re-implementations of one layer per docs/paper.md#norm-positions-per-layer.

Written from the formulas (explicit per-pair RoPE rotation, explicit masked softmax,
explicit RMSNorm/LayerNorm) and sharing only the parameter tensors with the model.
"""
import math

import torch


def norm_ref(x, w, b=None, eps=1e-6):
    if b is None:  # RMSNorm
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rope_ref(x, base):
    """x: (B, H, T, D). Pair i is (x[i], x[i + D/2]) rotated by angle t * base^(-2i/D)."""
    B, H, T, D = x.shape
    half = D // 2
    out = torch.empty_like(x)
    for i in range(half):
        theta = torch.arange(T, dtype=x.dtype) * base ** (-2.0 * i / D)
        c, s = torch.cos(theta), torch.sin(theta)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * c - b * s
        out[..., i + half] = a * s + b * c
    return out


def attn_ref(x, attn, base):
    B, T, _ = x.shape
    hd = attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, -1, hd).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(B, T, -1, hd).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(B, T, -1, hd).transpose(1, 2)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    q, k = rope_ref(q, base), rope_ref(k, base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(B, T, -1)
    return out @ attn.o_proj.weight.T


def mlp_ref(x, mlp):
    g = x @ mlp.gate_proj.weight.T
    return (g * torch.sigmoid(g) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def block_ref(x, block, num_layers, eps=1e-6, base=10000.0):
    """One layer exactly as the docs/paper.md#norm-positions-per-layer table writes it, for block.position."""
    p, l = block.position, block.layer_number
    N = lambda n, t: norm_ref(t, n.weight, n.bias, eps)  # noqa: E731
    A = lambda t: attn_ref(t, block.attn, base)  # noqa: E731
    M = lambda t: mlp_ref(t, block.mlp)  # noqa: E731
    if p == "pre":
        h = x + A(N(block.attn_norm, x))
        return h + M(N(block.mlp_norm, h))
    if p == "lns":
        s = 1 / math.sqrt(l)
        h = x + A(N(block.attn_norm, x) * s)
        return h + M(N(block.mlp_norm, h) * s)
    if p == "post":
        h = N(block.attn_norm, x + A(x))
        return N(block.mlp_norm, h + M(h))
    if p in ("deepnorm", "deeppost"):
        a = (2 * num_layers) ** 0.25 if p == "deepnorm" else math.sqrt(8)
        h = N(block.attn_norm, a * x + A(x))
        return N(block.mlp_norm, a * h + M(h))
    if p == "peri":
        h = x + N(block.attn_out_norm, A(N(block.attn_norm, x)))
        return h + N(block.mlp_out_norm, M(N(block.mlp_norm, h)))
    raise AssertionError(p)
