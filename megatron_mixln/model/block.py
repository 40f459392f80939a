"""One transformer layer whose norm position is data, fixed when the layer is built."""
from __future__ import annotations

import torch
from torch import nn

from megatron_mixln.model.attention import Attention
from megatron_mixln.model.config import ModelConfig
from megatron_mixln.model.mlp import SwiGLU
from megatron_mixln.model.norms import Norm, QKNorm, make_norm
from megatron_mixln.model.positions import QKV_NORM_POSITIONS, deepnorm_alpha, lns_scale
from megatron_mixln.model.two_stream import (LAYER_NORMS, LAYER_SCALES, FORWARDS, ChannelScale, TwoStreamFinalNorm,
                                              layer_form)

PRE_LIKE = ("pre", "lns", "hybrid-first")  # norm before each sublayer, residual stream un-normalised
POST_LIKE = ("post", "deepnorm", "deeppost")  # norm after each residual add
# Cross-block fusion: a layer ending in `h + d` can leave that add to the next layer when the next
# one starts with a norm of its (un-normalised) input -- add_norm(d, residual=h) does both at once.
ENDS_WITH_ADD = ("pre", "lns", "peri", "reordered", "hybrid", "hybrid-first")
STARTS_WITH_NORM = ("pre", "lns", "peri", "hybrid-first")
# every norm of a layer, by form (default: attn_norm and mlp_norm, which make the sublayers' inputs or
# follow their adds); a form is the position, or the SiameseNorm variant (two_stream.layer_form).
# HybridNorm's attention has no input norm (q/k/v norms instead, see qkv_norms).
BLOCK_NORMS = {"peri": ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm"), "hybrid": ("mlp_norm",),
               **LAYER_NORMS}


def norms_per_layer(position: str, siamese_variant: str = "post_pre") -> int:
    """Norm modules of one layer at `position` (2; 4 for peri; 6 for siamese post_pre, 4 for hybrid_pre; 1 for hybrid)."""
    return len(BLOCK_NORMS.get(layer_form(position, siamese_variant), ("attn_norm", "mlp_norm")))


def scales_per_layer(position: str, siamese_variant: str = "post_pre") -> int:
    """ChannelScale modules (hidden-size gains) of one layer: 1 for SiameseNorm hybrid_pre's c1, else 0."""
    return len(LAYER_SCALES.get(layer_form(position, siamese_variant), ()))


class Block(nn.Module):
    """A LLaMA layer; `position` picks where its norms sit (N = norm, a = residual scale, s = out scale).

        pre / lns:                 post / deepnorm / deeppost:     peri (sandwich):
          x ──┬─ N·s ─ Attn ─┐       x ──┬──── Attn ─┐               x ──┬─ N ─ Attn ─ N ─┐
              └──────────── (+)         └─── ·a ────(+)─ N              └────────────────(+)
          h ──┬─ N·s ─ MLP ──┐       h ──┬──── MLP ──┐               h ──┬─ N ─ MLP ── N ─┐
              └──────────── (+) ─ y     └─── ·a ────(+)─ N ─ y          └────────────────(+) ─ y

    s = 1/sqrt(layer_number) for lns, else 1; a = (2L)^(1/4) for deepnorm, sqrt(8) for deeppost,
    else 1. `layer_number` is 1-based and global (it survives pipeline splitting).

    Cross-block fusion (`hand_off_residual`, decided once by whoever chains the layers, see
    `plan_residual_handoff`): a pre/lns/peri layer followed by a pre/lns/peri layer (or by the final
    norm) skips its last add and returns the pair (h, d), standing for y = h + d; the next layer's
    first norm does the add and the norm as one `add_norm` (one fused kernel forward, one backward,
    instead of an add, a norm and a gradient add):

                   layer l                        |  layer l+1
        unfused:   h ─┬─ N ─ MLP ─ d ─(+)─ y ──────┼─ y ─┬─ N·s ─ Attn ─ ...
                      └────────────────┘           |     └─ residual
        fused:     h ─┬─ N ─ MLP ─ d ──────────────┼─ add_norm(d, residual=h) ─┬─ N(h + d)·s ─ Attn ─ ...
                      └─ h ─── (h, d) ─────────────┘                            └─ h + d: residual

    A post-like layer (its input goes un-normalised into attention) adds a pair it is given itself
    and never hands off (its output is already normalised), so every boundary -- pre->pre, pre->post,
    post->pre, peri, lns, a pipeline stage's edge -- computes exactly the unfused sums.

    Zoo positions (docs/norm-zoo.md):

        reordered (OLMo 2):             hybrid (HybridNorm):                  hybrid-first (HybridNorm*'s
          x ──┬── Attn ─ N ─┐             x ──┬── Attn(q,k,v normed) ─┐        block 1): pre with q/k/v
              └────────────(+)                └──────────────────────(+) ─ N ─ u      norms per head
          h ──┬── MLP ── N ─┐             u ──┬── MLP ─┐
              └────────────(+) ─ y            └───────(+) ─ y       (--no-hybrid-ffn-residual-after-norm:
                                                                      y = N(h + MLP(h)), h = x + Attn)

    --qk-norm head|full adds q_norm/k_norm inside any position's attention (hybrid positions always
    norm q, k and v per head).

    Two-stream positions (siamese, residual-dual) take and return a pair of residual streams; their
    forwards, with diagrams, are in `two_stream.py` (FORWARDS). They never hand off an add.

    Gated pre/lns layers (`config.gated_layers`, the reference code's scale_res_pre_norm) multiply each
    sublayer output by a learnable scalar before the add: h = x + g_a·Attn(N(x)); y = h + g_m·MLP(N(h)).
    """

    def __init__(self, config: ModelConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.position = config.positions[layer_number - 1]
        self.residual_scale = deepnorm_alpha(self.position, config.num_layers)
        self.out_scale = lns_scale(self.position, layer_number)
        self.hand_off_residual = False  # see plan_residual_handoff
        self.ffn_residual_after_norm = config.hybrid_ffn_residual_after_norm
        self.ends_with_add = self.position in ENDS_WITH_ADD and not (
            self.position == "hybrid" and not self.ffn_residual_after_norm)
        self.starts_with_norm = self.position in STARTS_WITH_NORM

        self.attn = Attention(config.hidden_size, config.num_attention_heads, config.num_query_groups,
                              config.rotary_base, **qkv_norms(config, self.position),
                              qkv_bias=config.qkv_bias, out_bias=config.add_bias_linear)
        self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size, bias=config.add_bias_linear)
        self.form = layer_form(self.position, config.siamese_variant)
        for name in BLOCK_NORMS.get(self.form, ("attn_norm", "mlp_norm")):
            setattr(self, name, make_norm(config, "attn" if name.startswith("attn") else "ffn"))
        for name in LAYER_SCALES.get(self.form, ()):
            setattr(self, name, ChannelScale(config.hidden_size))
        self.gated = layer_number in config.gated_layers
        if self.gated:  # 0-dim fp32 scalars; init_weights sets them to config.residual_gate_init
            self.attn_gate = nn.Parameter(torch.full((), config.residual_gate_init))
            self.mlp_gate = nn.Parameter(torch.full((), config.residual_gate_init))

    def forward(self, x):
        """x: (batch, seq, hidden), or a pair (h, d) meaning h + d (the previous layer's handed-off add).
        Returns y (batch, seq, hidden), or the pair (h, d) with y = h + d when `hand_off_residual`.
        Two-stream positions: x is the embedding or the pair of streams; returns the pair."""
        if self.position in FORWARDS:
            return FORWARDS[self.form](self, x)
        x, pending = x if isinstance(x, tuple) else (x, None)
        if self.position in PRE_LIKE:
            attn_in, x = first_norm(self.attn_norm, x, pending, self.out_scale)
            attn_out = self.attn(attn_in)
            if self.gated:
                attn_out = attn_out * self.attn_gate
            mlp_in, h = self.mlp_norm(attn_out, residual=x, out_scale=self.out_scale)  # h = x + attn_out
            mlp_out = self.mlp(mlp_in)
            return self._last_add(h, mlp_out * self.mlp_gate if self.gated else mlp_out)
        if self.position in POST_LIKE:
            if pending is not None:
                x = x + pending
            h, _ = self.attn_norm(self.attn(x), residual=x, residual_scale=self.residual_scale)
            y, _ = self.mlp_norm(self.mlp(h), residual=h, residual_scale=self.residual_scale)
            return y
        if self.position == "reordered":
            if pending is not None:
                x = x + pending
            h = self.attn_norm.then_add(self.attn(x), x)  # h = x + N(Attn(x))
            mlp_out = self.mlp(h)
            return (h, self.mlp_norm(mlp_out)) if self.hand_off_residual else self.mlp_norm.then_add(mlp_out, h)
        if self.position == "hybrid":
            if pending is not None:
                x = x + pending
            attn_out = self.attn(x)  # q, k, v normed per head inside
            if not self.ffn_residual_after_norm:  # textbook Post-Norm FFN
                h = x + attn_out
                return self.mlp_norm(self.mlp(h), residual=h)[0]  # y = N(h + MLP(h))
            u, _ = self.mlp_norm(attn_out, residual=x)  # u = N(x + Attn(x))
            return self._last_add(u, self.mlp(u))
        # peri: the MLP's input norm is fused with the attention residual add.
        attn_in, x = first_norm(self.attn_norm, x, pending)
        mlp_in, h = self.mlp_norm(self.attn_out_norm(self.attn(attn_in)), residual=x)  # h = x + N(attn_out)
        return self._last_add(h, self.mlp_out_norm(self.mlp(mlp_in)))

    def _last_add(self, h, d):
        return (h, d) if self.hand_off_residual else h + d

    def extra_repr(self):
        handoff = ", hands off its last add" if self.hand_off_residual else ""
        gated = ", gated" if self.gated else ""
        form = f", form={self.form}" if self.form != self.position else ""
        return f"layer_number={self.layer_number}, position={self.position}{form}{handoff}{gated}"


def qkv_norms(config: ModelConfig, position: str) -> dict:
    """The q_norm/k_norm (and, on hybrid positions, v_norm) QKNorm modules of one layer's attention, by name."""
    hybrid = position in QKV_NORM_POSITIONS
    mode = "head" if hybrid else config.qk_norm
    if mode == "none":
        return {}
    heads = {"q_norm": config.num_attention_heads, "k_norm": config.num_query_groups, "v_norm": config.num_query_groups}
    alpha = config.dyt_alpha_inits[0]
    return {name: QKNorm(heads[name], config.head_dim, mode, config.norm_kind, config.norm_epsilon,
                         config.qk_norm_per_head_gain, alpha, bias=True if config.dyt_bias else None)
            for name in (("q_norm", "k_norm", "v_norm") if hybrid else ("q_norm", "k_norm"))}


def first_norm(norm: Norm, x, pending, out_scale: float = 1.0):
    """-> (norm(x + pending) * out_scale, x + pending): one add_norm; plain norm(x) when nothing is pending."""
    if pending is None:
        return norm(x, out_scale=out_scale), x
    return norm(pending, residual=x, out_scale=out_scale)


def resolve_stream(x, norm: nn.Module | None = None):
    """A layer's output as one tensor: h + d for a handed-off pair, through `norm` if given (the
    final norm: then the add is fused into it too); a two-stream pair through its final norms."""
    if isinstance(norm, TwoStreamFinalNorm):
        return norm(x)
    if isinstance(norm, Norm):
        return norm(x[1], residual=x[0])[0] if isinstance(x, tuple) else norm(x)
    if isinstance(x, tuple):
        x = x[0] + x[1]
    return norm(x) if norm is not None else x


def plan_residual_handoff(blocks, then_norm: bool) -> None:
    """Decide, once, which of these consecutive blocks hand their last residual add to the next one:
    those ending with an add (ENDS_WITH_ADD) whose next block starts with a norm (STARTS_WITH_NORM);
    the last block when `then_norm` (a final norm follows it in the same process/stage)."""
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        takes = blocks[i + 1].starts_with_norm if i + 1 < len(blocks) else then_norm
        block.hand_off_residual = block.ends_with_add and takes
