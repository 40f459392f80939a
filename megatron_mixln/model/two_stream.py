"""Two-stream residual placements (SiameseNorm, ResiDual): the layer forwards and the final norms.

Both keep a second residual stream next to the usual one. It travels between layers as part of the
layer's input/output: a layer takes the pair (x, y) and returns the next pair; the first layer gets
the embedding as a plain tensor and starts both streams from it (x = y = embedding, as both official
codes do). The final norms (`TwoStreamFinalNorm`) turn the last pair into the LM head's input.

SiameseNorm, arXiv 2602.08064, as its official code (Qwen-Applications/SiameseNorm), in one of two
variants named as that code's MODEL_TYPE (--siamese-variant; docs/two-stream.md says which is the
default and why). For each sublayer F of layer l (1-based, global), with c = sqrt(2l):

  post_pre (the post-pre block of `deit-model-siamesenorm.py` / `dit-model-siamesenorm.py`):
    x <- N_x(x)                    (post-norm stream: normalised before every sublayer)
    u  = N_in(x + N_y(y))          (the sublayer sees both streams; y is normalised, never overwritten)
  hybrid_pre (`OLMo_model_hybrid_pre.py`, `OLMoSequentialBlock`, with attn_norm off and ffn_norm on,
  residual after the norm): the attention sublayer has no norm on x, a learnable gain c1 (init 1) instead
    attention: u = c1 * x + N_y(y)
    MLP:       x <- N_x(x) ;  u = N_in(x + N_y(y))       (as post_pre)
  both:
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

from megatron_mixln.model.norms import make_norm


def start_streams(h):
    """A layer's input as the pair of streams: a tensor (the embedding) starts both from itself."""
    return h if isinstance(h, tuple) else (h, h)


def siamese_forward(block, h):
    """SiameseNorm post_pre layer. h: (batch, seq, hidden) embedding or the pair (x, y); returns the pair (x, y).

        x ── N_x ──┬──────────────(+ z/c)── N_x' ──┬──────────────(+ z/c)─── x
                   └─(+)─ N_in ─ Attn ─ z             └─(+)─ N_in' ─ MLP ─ z
        y ─┬─ N_y ──┘                  ┌─(+ z)─┬─ N_y' ┘                 ┌─(+ z)── y
           └──────────────────────────┘       └─────────────────────────┘

    Each add that a norm follows runs as one fused add_norm: N_x'(x + z/c), N_y'(y + z), N_in(x + N_y(y)).
    """
    x, y = start_streams(h)
    x = block.attn_x_norm(x)
    attn_in, _ = block.attn_norm(block.attn_y_norm(y), residual=x)  # N_in(x + N_y(y))
    return _siamese_mlp(block, x, y, block.attn(attn_in))


def siamese_hybrid_pre_forward(block, h):
    """SiameseNorm hybrid_pre layer. h: (batch, seq, hidden) embedding or the pair (x, y); returns the pair.

        x ──── ·c1 ─┬──────────────(+ z/c)── N_x' ──┬──────────────(+ z/c)─── x
                    └─(+)─ Attn ─ z                    └─(+)─ N_in' ─ MLP ─ z
        y ─┬─ N_y ───┘        ┌─(+ z)─┬─ N_y' ──────────┘                 ┌─(+ z)── y
           └─────────────────┘       └──────────────────────────────────┘

    The attention sees c1 * x + N_y(y) with no norm on x (the official code's attn_norm=False branch);
    the MLP half is post_pre's.
    """
    x, y = start_streams(h)
    attn_in = torch.addcmul(block.attn_y_norm(y), block.attn_x_scale.weight, x)  # c1 * x + N_y(y)
    return _siamese_mlp(block, x, y, block.attn(attn_in))


def _siamese_mlp(block, x, y, z):
    """The attention's adds and the MLP sublayer, the same in both SiameseNorm variants:
    x <- N_x'(x + z/c); y <- y + z; z = MLP(N_in'(x + N_y'(y))); returns (x + z/c, y + z)."""
    inv_c = 1.0 / math.sqrt(2 * block.layer_number)
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


# A two-stream layer's form: its position, or "siamese-<variant>" for a non-default SiameseNorm variant.
SIAMESE_VARIANTS = ("post_pre", "hybrid_pre")  # the official code's MODEL_TYPE names; the first is the default
FORWARDS = {"siamese": siamese_forward, "siamese-hybrid_pre": siamese_hybrid_pre_forward,
            "residual-dual": residual_dual_forward}
# every norm of a layer of that form (a one-stream layer has attn_norm and mlp_norm, plus peri's two)
LAYER_NORMS = {"siamese": ("attn_x_norm", "attn_y_norm", "attn_norm", "mlp_x_norm", "mlp_y_norm", "mlp_norm"),
               "siamese-hybrid_pre": ("attn_y_norm", "mlp_x_norm", "mlp_y_norm", "mlp_norm"),
               "residual-dual": ("attn_norm", "mlp_norm")}
# learnable per-channel gains (ChannelScale) of a layer of that form: hybrid_pre's c1
LAYER_SCALES = {"siamese-hybrid_pre": ("attn_x_scale",)}
# the final norms that combine the last pair: SiameseNorm N_f(N_fx(x) + N_fy(y)); ResiDual x + N_d(d)
FINAL_NORMS = {"siamese": ("x_norm", "y_norm", "out_norm"), "residual-dual": ("d_norm",)}


def layer_form(position: str, siamese_variant: str = "post_pre") -> str:
    """The key of FORWARDS / LAYER_NORMS for a layer: the position, or 'siamese-hybrid_pre'."""
    if position == "siamese" and siamese_variant != SIAMESE_VARIANTS[0]:
        return f"siamese-{siamese_variant}"
    return position


class ChannelScale(nn.Module):
    """A learnable gain y = weight * x over the last dimension: per channel, weight (hidden,) initialised to 1
    (SiameseNorm hybrid_pre's c1), or one scalar for all channels, weight (1,) (the embedding scale of DyT's
    LLaMA code, initialised to sqrt(hidden)). Replicated over TP like a norm gain, so sequence parallelism
    sums its gradient."""

    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.init = float(init)
        self.weight = nn.Parameter(torch.full((dim,), self.init))

    def reset_parameters(self):
        nn.init.constant_(self.weight, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., hidden) -> weight * x, same shape (called as a module so that ZeRO-3 gathers weight)."""
        return x * self.weight

    def extra_repr(self):
        return f"{self.weight.shape[0]}, init={self.init:g}"


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
