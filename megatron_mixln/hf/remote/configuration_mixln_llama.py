"""Configuration of a LLaMA decoder whose layers each carry their own norm position (Mix-LN and relatives).

Self-contained: imports only transformers and the standard library, so an exported directory loads with
`AutoConfig.from_pretrained(DIR, trust_remote_code=True)` wherever transformers (>= 5) is installed.

Per layer l (0-based index i = l - 1), with N a norm whose statistics are computed in fp32:

    pre       h = x + Attn(N1(x));               y = h + MLP(N2(h))
    lns       h = x + Attn(N1(x)/sqrt(l));       y = h + MLP(N2(h)/sqrt(l))
    post      h = N1(x + Attn(x));               y = N2(h + MLP(h))
    deepnorm  h = N1(a*x + Attn(x));             y = N2(a*h + MLP(h)),  a = (2L)^(1/4)
    deeppost  as deepnorm with a = sqrt(8)
    peri      h = x + N1b(Attn(N1a(x)));         y = h + N2b(MLP(N2a(h)))
    reordered h = x + N1(Attn(x));               y = h + N2(MLP(h))                  (OLMo 2)
    hybrid    h = x + Attn(x), q/k/v normed per head;  u = N2(h); y = u + MLP(u)   (HybridNorm)
              (hybrid_ffn_residual_after_norm false: y = N2(h + MLP(h)))
    hybrid-first  pre, with q/k/v normed per head                                  (HybridNorm*'s first block)

Two residual streams (every layer or none; both start as the embedding), per sublayer F of layer l:

    siamese        x <- Nx(x); o = F(Nin(x + Ny(y))); x <- x + o/sqrt(2l); y <- y + o   (SiameseNorm, arXiv 2602.08064)
                   LM-head input Nf(Nfx(x) + Nfy(y))
                   siamese_variant "hybrid_pre": the attention's input is c1*x + Ny(y) instead (c1 a learnable
                   per-channel gain, no Nx and no Nin before attention); the MLP as above
    residual-dual  o = F(x); x <- N(x + o); d <- d + o                                 (ResiDual, arXiv 2304.14802)
                   LM-head input x + Nd(d)

Fields beyond LlamaConfig's:
    norm_positions     list of L position names (resolved: a Mix-LN schedule is written out layer by layer)
    residual_scales    list of L floats a (DeepNorm's alpha; 1.0 elsewhere)
    output_scales      list of L floats s multiplying both norm outputs (LNS: 1/sqrt(layer_number); else 1.0)
    layer_numbers      list of L 1-based layer numbers the scales were computed from (kept when layers are removed)
    normalization      "RMSNorm", "LayerNorm" (with a bias), "DyT" (weight*tanh(alpha*x) (+bias)) or
                       "Derf" (weight*erf(alpha*x + shift) + bias); alpha, shift learnable scalars
    qk_norm            "none", "head" (q, k normed over each head's head_dim before RoPE) or "full" (over the
                       whole q / k projection)
    qk_norm_per_head_gain  head QK-norm (and hybrid layers' q/k/v norms) with one gain per head
    hybrid_ffn_residual_after_norm  see hybrid above
    dyt_bias           DyT norms have a bias
    learnable_embedding_scale  the embedding output is multiplied by a learnable scalar
                       (model.embed_tokens.embed_scale, shape (1,); DyT's LLaMA code's shared_scale)
    final_norm         whether a norm precedes the LM head
    lm_head_bias       the LM head has a bias (no stock class has one); q/k/v/o and MLP biases are LlamaConfig's
                       attention_bias / mlp_bias
    siamese_variant    SiameseNorm block: "post_pre" (default) or "hybrid_pre" (the official code's MODEL_TYPE)
    real_vocab_size    the tokenizer's vocabulary (vocab_size is the padded embedding size)
    mixln_model_config the training stack's full model config, verbatim (for the way back)
"""
from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig

NORM_POSITIONS = ("pre", "post", "peri", "lns", "deepnorm", "deeppost", "siamese", "residual-dual",
                  "reordered", "hybrid", "hybrid-first")
TWO_STREAM = ("siamese", "residual-dual")
SIAMESE_VARIANTS = ("post_pre", "hybrid_pre")
NORMALIZATIONS = ("RMSNorm", "LayerNorm", "DyT", "Derf")
QK_NORMS = ("none", "head", "full")


def default_residual_scale(position: str, num_layers: int) -> float:
    """DeepNet's a = (2L)^(1/4) for deepnorm, the Mix-LN reference code's fixed sqrt(8) for deeppost, else 1."""
    if position == "deepnorm":
        return (2 * num_layers) ** 0.25
    if position == "deeppost":
        return math.sqrt(8.0)
    return 1.0


def default_output_scale(position: str, layer_number: int) -> float:
    """LayerNorm Scaling: 1/sqrt(l) for the 1-based layer number l of an lns layer, else 1."""
    return 1.0 / math.sqrt(layer_number) if position == "lns" else 1.0


@strict
class MixLNLlamaConfig(LlamaConfig):
    model_type = "mixln_llama"

    norm_positions: list | None = None
    residual_scales: list | None = None
    output_scales: list | None = None
    layer_numbers: list | None = None
    normalization: str = "RMSNorm"
    final_norm: bool = True
    lm_head_bias: bool = False
    siamese_variant: str = "post_pre"
    qk_norm: str = "none"
    qk_norm_per_head_gain: bool = False
    hybrid_ffn_residual_after_norm: bool = True
    dyt_bias: bool = False
    learnable_embedding_scale: bool = False
    real_vocab_size: int | None = None
    mixln_model_config: dict | None = None

    def __post_init__(self, **kwargs):
        L = self.num_hidden_layers
        if self.norm_positions is None:
            self.norm_positions = ["pre"] * L
        if self.layer_numbers is None:
            self.layer_numbers = list(range(1, L + 1))
        if self.residual_scales is None:
            self.residual_scales = [default_residual_scale(p, L) for p in self.norm_positions]
        if self.output_scales is None:
            self.output_scales = [default_output_scale(p, n) for p, n in zip(self.norm_positions, self.layer_numbers)]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of @strict validation: one known position and one scale per layer."""
        super().validate_architecture()
        L = self.num_hidden_layers
        for name in ("norm_positions", "residual_scales", "output_scales", "layer_numbers"):
            if len(getattr(self, name)) != L:
                raise ValueError(f"config.json: {name} has {len(getattr(self, name))} entries, num_hidden_layers is {L}")
        bad = sorted(set(self.norm_positions) - set(NORM_POSITIONS))
        if bad:
            raise ValueError(f"config.json: norm_positions: unknown {bad}; allowed: {', '.join(NORM_POSITIONS)}")
        streams = set(self.norm_positions) & set(TWO_STREAM)
        if streams and len(set(self.norm_positions)) > 1:
            raise ValueError(f"config.json: norm_positions: {sorted(streams)[0]} carries a second residual stream "
                             "through the whole model; it must be the position of every layer")
        if streams and not self.final_norm:
            raise ValueError("config.json: final_norm: a two-stream model needs its final norms")
        if self.siamese_variant not in SIAMESE_VARIANTS:
            raise ValueError(f"config.json: siamese_variant: unknown {self.siamese_variant!r}; "
                             f"allowed: {', '.join(SIAMESE_VARIANTS)}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"config.json: normalization: unknown {self.normalization!r}; allowed: {', '.join(NORMALIZATIONS)}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"config.json: qk_norm: unknown {self.qk_norm!r}; allowed: {', '.join(QK_NORMS)}")


__all__ = ["MixLNLlamaConfig"]
