"""Two-stream residual placements (SiameseNorm, ResiDual): the layer forwards and the final norms.

Both keep a second residual stream next to the usual one. It travels between layers as part of the
layer's input/output: a layer takes the pair (x, y) and returns the next pair; the first layer gets
the embedding as a plain tensor and starts both streams from it (x = y = embedding, as both official
codes do). The final norms (`TwoStreamFinalNorm`) turn the last pair into the LM head's input.

SiameseNorm, arXiv 2602.08064, as its official code (Qwen-Applications/SiameseNorm, the post-pre
block of `deit-model-siamesenorm.py` / `dit-model-siamesenorm.py`; `OLMo_model_hybrid_pre.py` keeps
the same 1/sqrt(2l), the y = x start and the three final norms). For each sublayer F of layer l
(1-based, global), with c = sqrt(2l):

    x <- N_x(x)                    (post-norm stream: normalised before every sublayer)
    u  = N_in(x + N_y(y))          (the sublayer sees both streams; y is normalised, never overwritten)
    z  = F(u)
    x <- x + z / c ;  y <- y + z   (y: the pre-norm-like raw stream)
    head input = N_f(N_fx(x) + N_fy(y))

ResiDual, arXiv 2304.14802 eq. (ResiDual / Pre-Post-LN), as microsoft/ResiDual's `resi_dual_layers.py`
with its defaults (enc/dec_alpha = 1, res_input_norm_scale = 1):

    x <- N(x + F(x)) ;  d <- d + F(x)     per sublayer (x: Post-LN stream, d: the dual stream)
    head input = x_L + N_d(d_L)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megatron_mixln.model.norms import Norm, make_norm


def start_streams(h):
    """A layer's input as the pair of streams: a tensor (the embedding) starts both from itself."""
    return h if isinstance(h, tuple) else (h, h)


def siamese_forward(block, h):
    """SiameseNorm layer. h: (batch, seq, hidden) embedding or the pair (x, y); returns the pair (x, y).

        x ── N_x ──┬──────────────(+ z/c)── N_x' ──┬──────────────(+ z/c)─── x
                   └─(+)─ N_in ─ Attn ─ z             └─(+)─ N_in' ─ MLP ─ z
        y ─┬─ N_y ──┘                  ┌─(+ z)─┬─ N_y' ┘                 ┌─(+ z)── y
           └──────────────────────────┘       └─────────────────────────┘

    Each add that a norm follows runs as one fused add_norm: N_x'(x + z/c), N_y'(y + z), N_in(x + N_y(y)).
    """
    x, y = start_streams(h)
    inv_c = 1.0 / math.sqrt(2 * block.layer_number)
    x = block.attn_x_norm(x)
    attn_in, _ = block.attn_norm(block.attn_y_norm(y), residual=x)  # N_in(x + N_y(y))
    z = block.attn(attn_in)
    x, _ = block.mlp_x_norm(z * inv_c, residual=x)  # N_x'(x + z/c)
    y_normed, y = block.mlp_y_norm(z, residual=y)  # (N_y'(y + z), y + z)
    mlp_in, _ = block.mlp_norm(y_normed, residual=x)  # N_in'(x + N_y'(y))
    z = block.mlp(mlp_in)
    return x + z * inv_c, y + z


def residual_dual_forward(block, h):
    """ResiDual layer. h: (batch, seq, hidden) embedding or the pair (x, d); returns the pair (x, d).

        x ──┬── Attn ── z ─(+)─ N ─┬── MLP ── z ─(+)─ N ── x
            └───────────────┘      └───────────────┘
        d ────────── (+ z) ──────────────── (+ z) ──────── d
    """
    x, d = start_streams(h)
    z = block.attn(x)
    d = d + z
    x, _ = block.attn_norm(z, residual=x)  # N(x + Attn(x))
    z = block.mlp(x)
    x, _ = block.mlp_norm(z, residual=x)
    return x, d + z


FORWARDS = {"siamese": siamese_forward, "residual-dual": residual_dual_forward}
# norms a layer has besides attn_norm / mlp_norm (the norms whose outputs feed attention / the MLP)
EXTRA_NORMS = {"siamese": ("attn_x_norm", "attn_y_norm", "mlp_x_norm", "mlp_y_norm"), "residual-dual": ()}
# the final norms that combine the last pair: SiameseNorm N_f(N_fx(x) + N_fy(y)); ResiDual x + N_d(d)
FINAL_NORMS = {"siamese": ("x_norm", "y_norm", "out_norm"), "residual-dual": ("d_norm",)}


class TwoStreamFinalNorm(nn.Module):
    """The last pair of streams -> the LM head's input (batch, seq, hidden); formulas in the module
    docstring. Its norms are plain `Norm`s, so TP/SP treat them as every other norm."""

    def __init__(self, position: str, make_norm):
        super().__init__()
        self.position = position
        for name in FINAL_NORMS[position]:
            setattr(self, name, make_norm())

    def forward(self, h):
        x, y = start_streams(h)
        if self.position == "siamese":
            return self.out_norm(self.y_norm(y), residual=self.x_norm(x))[0]  # N_f(N_fx(x) + N_fy(y))
        return x + self.d_norm(y)

    def extra_repr(self):
        return f"position={self.position}"


def stream_count(positions) -> int:
    """2 for a two-stream model, else 1 (tensors on the residual path between layers)."""
    return 2 if positions and positions[0] in FORWARDS else 1


def final_norm_count(config) -> int:
    """Norm modules before the LM head: 3 for SiameseNorm, 1 otherwise (0 with --no-final-norm)."""
    return len(FINAL_NORMS.get(config.positions[0], ("norm",))) if config.final_norm else 0


def make_final_norm(config) -> nn.Module:
    """The norm(s) before the LM head: `TwoStreamFinalNorm` for a two-stream model, else one `Norm`
    (nn.Identity with --no-final-norm, which the config refuses for two-stream models)."""
    if not config.final_norm:
        return nn.Identity()
    def final():
        return make_norm(config, "final")
    position = config.positions[0]
    return TwoStreamFinalNorm(position, final) if position in FORWARDS else final()
