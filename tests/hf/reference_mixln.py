"""The Mix-LN reference code's decoder written from the published formulas
(docs/paper.md#norm-positions-per-layer), in float64, with the reference code's module names -- an
independent model for the import test.

Layer kinds and their norms (reference names):
    post      h = post_attention_layernorm(x + Attn(x)); y = post_feedforward_layernorm(h + MLP(h))
    pre       h = x + Attn(input_layernorm(x));          y = h + MLP(post_attention_layernorm(h))
    sandwich  h = x + post_attention_layernorm(Attn(input_layernorm(x)))
              y = h + post_feedforward_layernorm(MLP(pre_feedforward_layernorm(h)))
then model.norm and lm_head. RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w; RoPE rotate-half, base 10000.
"""
from __future__ import annotations

import math

import torch

NORMS = {"post": ("post_attention_layernorm", "post_feedforward_layernorm"),
         "pre": ("input_layernorm", "post_attention_layernorm"),
         "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                      "post_feedforward_layernorm")}


def random_weights(kinds, vocab, hidden, ffn, heads, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.1):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    sd = {"model.embed_tokens.weight": w(vocab, hidden, std=1.0), "model.norm.weight": 1 + w(hidden, std=0.3),
          "lm_head.weight": w(vocab, hidden)}
    for i, kind in enumerate(kinds):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = w(hidden, hidden, std=0.3)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = w(ffn, hidden, std=0.3), w(ffn, hidden, std=0.3)
        sd[p + "mlp.down_proj.weight"] = w(hidden, ffn, std=0.3)
        for n in NORMS[kind]:
            sd[p + f"{n}.weight"] = 1 + w(hidden, std=0.3)
        sd[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, hidden // heads, 2).float() / (hidden // heads))
    return sd


def forward(sd: dict, kinds, tokens: torch.Tensor, heads: int, eps: float = 1e-6) -> torch.Tensor:
    """tokens (batch, seq) -> float64 logits (batch, seq, vocab)."""
    def rms(x, name):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * sd[name + ".weight"]

    def attn(x, p):
        b, t, h = x.shape
        d = h // heads
        q, k, v = (torch.einsum("bth,oh->bto", x, sd[p + f"self_attn.{n}.weight"]).view(b, t, heads, d).transpose(1, 2)
                   for n in ("q_proj", "k_proj", "v_proj"))
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.outer(torch.arange(t, dtype=torch.float64), inv)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rope(z):
            z1, z2 = z[..., : d // 2], z[..., d // 2:]
            return z * cos + torch.cat([-z2, z1], -1) * sin

        q, k = rope(q), rope(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)
        return out @ sd[p + "self_attn.o_proj.weight"].T

    def mlp(x, p):
        g, u = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
        return (g * torch.sigmoid(g) * u) @ sd[p + "mlp.down_proj.weight"].T

    x = sd["model.embed_tokens.weight"][tokens]
    for i, kind in enumerate(kinds):
        p = f"model.layers.{i}."
        if kind == "post":
            h = rms(x + attn(x, p), p + "post_attention_layernorm")
            x = rms(h + mlp(h, p), p + "post_feedforward_layernorm")
        elif kind == "pre":
            h = x + attn(rms(x, p + "input_layernorm"), p)
            x = h + mlp(rms(h, p + "post_attention_layernorm"), p)
        else:
            h = x + rms(attn(rms(x, p + "input_layernorm"), p), p + "post_attention_layernorm")
            x = h + rms(mlp(rms(h, p + "pre_feedforward_layernorm"), p), p + "post_feedforward_layernorm")
    return rms(x, "model.norm") @ sd["lm_head.weight"].T
