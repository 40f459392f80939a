"""Independent, deliberately naive re-implementations of one layer per docs/paper.md#norm-positions-per-layer.

Written from the formulas (explicit per-pair RoPE rotation, explicit masked softmax,
explicit RMSNorm/LayerNorm) and sharing only the parameter tensors with the model.
"""
import math

import torch


def norm_ref(x, w, b=None, eps=1e-6, kind=None, alpha=None, shift=None):
    if kind == "dyt":  # DyT, arXiv 2503.10622 Eq. 1 (beta optional)
        y = torch.tanh(alpha * x) * w
        return y if b is None else y + b
    if kind == "derf":  # Derf, arXiv 2512.10938
        return torch.erf(alpha * x + shift) * w + b
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


def apply_norm(n, t, eps):
    """Norm module n (only its parameters and kind are read) applied to t over the last dim, by its formula."""
    return norm_ref(t, n.weight, n.bias, eps, n.kind if n.kind in ("dyt", "derf") else None, n.alpha, n.shift)


def qk_norm_ref(t, n, hd, eps):
    """QK-norm of a projection output t (B, T, heads*hd): "full" over all heads*hd (OLMo 2), "head" over each
    head's hd with a shared (hd,) or per-head (heads, hd) gain (Qwen3 / Cohere)."""
    if n.mode == "full":
        return apply_norm(n, t, eps)
    B, T, _ = t.shape
    heads = t.view(B, T, -1, hd)
    if n.kind in ("dyt", "derf"):
        return apply_norm(n, heads, eps).reshape(B, T, -1)
    if n.kind == "layernorm":
        heads = heads - heads.mean(-1, keepdim=True)
    y = heads / torch.sqrt((heads * heads).mean(-1, keepdim=True) + eps) * n.weight
    return (y if n.bias is None else y + n.bias).reshape(B, T, -1)


def linear_ref(x, lin):
    """x W^T (+ b when the linear has a bias: --add-qkv-bias, --add-bias-linear, --add-output-layer-bias)."""
    y = x @ lin.weight.T
    return y if lin.bias is None else y + lin.bias


def attn_ref(x, attn, base, eps=1e-6):
    B, T, _ = x.shape
    hd = attn.head_dim
    q, k, v = linear_ref(x, attn.q_proj), linear_ref(x, attn.k_proj), linear_ref(x, attn.v_proj)
    q, k, v = (t if n is None else qk_norm_ref(t, n, hd, eps) for t, n in ((q, attn.q_norm), (k, attn.k_norm), (v, attn.v_norm)))
    q = q.view(B, T, -1, hd).transpose(1, 2)
    k = k.view(B, T, -1, hd).transpose(1, 2)
    v = v.view(B, T, -1, hd).transpose(1, 2)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    q, k = rope_ref(q, base), rope_ref(k, base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(B, T, -1)
    return linear_ref(out, attn.o_proj)


def mlp_ref(x, mlp):
    g = linear_ref(x, mlp.gate_proj)
    return linear_ref(g * torch.sigmoid(g) * linear_ref(x, mlp.up_proj), mlp.down_proj)


def block_ref(x, block, num_layers, eps=1e-6, base=10000.0):
    """One layer exactly as the docs/paper.md#norm-positions-per-layer table writes it, for block.position."""
    p, l = block.position, block.layer_number
    N = lambda n, t: apply_norm(n, t, eps)  # noqa: E731
    A = lambda t: attn_ref(t, block.attn, base, eps)  # noqa: E731
    M = lambda t: mlp_ref(t, block.mlp)  # noqa: E731
    if p in ("pre", "hybrid-first"):  # hybrid-first: HybridNorm*'s first block, Pre-Norm with q/k/v norms
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
    if p == "reordered":  # OLMo 2: the norm of each sublayer output, before the residual add
        h = x + N(block.attn_norm, A(x))
        return h + N(block.mlp_norm, M(h))
    if p == "hybrid":  # HybridNorm: q/k/v norms in A; FFN residual taken after the norm (its code)
        h = x + A(x)
        if not block.ffn_residual_after_norm:  # textbook Post-Norm FFN
            return N(block.mlp_norm, h + M(h))
        u = N(block.mlp_norm, h)
        return u + M(u)
    raise AssertionError(p)
