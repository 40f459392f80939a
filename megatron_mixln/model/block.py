"""One transformer layer whose norm position is data, fixed when the layer is built."""
from __future__ import annotations

import torch
from torch import nn

from megatron_mixln.model.attention import Attention
from megatron_mixln.model.config import ModelConfig
from megatron_mixln.model.mlp import SwiGLU
from megatron_mixln.model.norms import Norm
from megatron_mixln.model.positions import deepnorm_alpha, lns_scale

PRE_LIKE = ("pre", "lns")  # norm before each sublayer, residual stream un-normalised
POST_LIKE = ("post", "deepnorm", "deeppost")  # norm after each residual add


class Block(nn.Module):
    """A LLaMA layer; `position` picks where its norms sit (N = norm, a = residual scale, s = out scale).

        pre / lns:                 post / deepnorm / deeppost:     peri (sandwich):
          x ──┬─ N·s ─ Attn ─┐       x ──┬──── Attn ─┐               x ──┬─ N ─ Attn ─ N ─┐
              └──────────── (+)         └─── ·a ────(+)─ N              └────────────────(+)
          h ──┬─ N·s ─ MLP ──┐       h ──┬──── MLP ──┐               h ──┬─ N ─ MLP ── N ─┐
              └──────────── (+) ─ y     └─── ·a ────(+)─ N ─ y          └────────────────(+) ─ y

    s = 1/sqrt(layer_number) for lns, else 1; a = (2L)^(1/4) for deepnorm, sqrt(8) for deeppost,
    else 1. `layer_number` is 1-based and global (it survives pipeline splitting).

    Gated pre/lns layers (`config.gated_layers`, the reference code's scale_res_pre_norm) multiply each
    sublayer output by a learnable scalar before the add: h = x + g_a·Attn(N(x)); y = h + g_m·MLP(N(h)).
    """

    def __init__(self, config: ModelConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.position = config.positions[layer_number - 1]
        self.residual_scale = deepnorm_alpha(self.position, config.num_layers)
        self.out_scale = lns_scale(self.position, layer_number)

        def norm():
            return Norm(config.hidden_size, config.norm_kind, config.norm_epsilon, config.norm_impl)

        self.attn = Attention(config.hidden_size, config.num_attention_heads, config.num_query_groups, config.rotary_base)
        self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size)
        self.attn_norm, self.mlp_norm = norm(), norm()
        if self.position == "peri":
            self.attn_out_norm, self.mlp_out_norm = norm(), norm()
        self.gated = layer_number in config.gated_layers
        if self.gated:  # 0-dim fp32 scalars; init_weights sets them to config.residual_gate_init
            self.attn_gate = nn.Parameter(torch.full((), config.residual_gate_init))
            self.mlp_gate = nn.Parameter(torch.full((), config.residual_gate_init))

    def forward(self, x):
        if self.position in PRE_LIKE:
            attn_out = self.attn(self.attn_norm(x, out_scale=self.out_scale))
            if self.gated:
                attn_out = attn_out * self.attn_gate
            mlp_in, h = self.mlp_norm(attn_out, residual=x, out_scale=self.out_scale)  # h = x + attn_out
            mlp_out = self.mlp(mlp_in)
            return h + (mlp_out * self.mlp_gate if self.gated else mlp_out)
        if self.position in POST_LIKE:
            h, _ = self.attn_norm(self.attn(x), residual=x, residual_scale=self.residual_scale)
            y, _ = self.mlp_norm(self.mlp(h), residual=h, residual_scale=self.residual_scale)
            return y
        # peri: the MLP's input norm is fused with the attention residual add.
        attn_out = self.attn_out_norm(self.attn(self.attn_norm(x)))
        mlp_in, h = self.mlp_norm(attn_out, residual=x)  # h = x + N(attn_out)
        return h + self.mlp_out_norm(self.mlp(mlp_in))

    def extra_repr(self):
        return f"layer_number={self.layer_number}, position={self.position}" + (", gated" if self.gated else "")
