"""A LLaMA decoder whose layers each carry their own norm position, for transformers (`trust_remote_code`).

Self-contained: imports only torch, transformers and the configuration file beside it. Everything outside
the decoder layer (embedding, rotary embedding, attention with every backend, causal/padding masks, the KV
cache, `generate()`, `output_hidden_states`, gradient checkpointing, the loss) is transformers' own LLaMA
code; only the layer (where its norms sit) and the final norm (optional, RMSNorm or LayerNorm) differ.

State-dict names follow the Mix-LN reference code, so its checkpoints load unchanged. Mind that a name
does not fix a role; the position does (the reference code's "post_attention_layernorm" trap):

    position             input_layernorm   post_attention_layernorm   pre_feedforward_layernorm  post_feedforward_layernorm
    pre, lns             before attention  before the MLP             -                          -
    post, deep*          -                 after the attention add    -                          after the MLP add
    peri                 before attention  on the attention output    before the MLP             on the MLP output
    reordered            -                 on the attention output    -                          on the MLP output
    hybrid               -                 after the attention add    -                          -
    hybrid-first         before attention  before the MLP             -                          -
    residual-dual        -                 after the attention add    -                          after the MLP add

siamese layers name their six norms attn_x_layernorm, attn_y_layernorm, input_layernorm (attention input),
mlp_x_layernorm, mlp_y_layernorm, post_attention_layernorm (MLP input); with siamese_variant "hybrid_pre"
the first and third are absent and attn_x_scale.weight (c1) multiplies x in the attention input. Two-stream layers (siamese,
residual-dual) take and return the pair of residual streams (x, y) as `hidden_states` (the first layer
gets the embedding and starts both from it); the final norm module (`model.norm`) combines the pair, and
`output_hidden_states` reports the x stream.

QK-norm (`config.qk_norm`, and always per head on hybrid layers, with v too): self_attn.q_norm / k_norm /
v_norm normalise the projections' outputs before RoPE (a forward hook on the projection), as the training
stack's attention does.

Norm arithmetic matches the training stack: the residual add a*r + x and the normalisation are computed in
fp32 and rounded once to the activation dtype; weight (and bias) multiply in fp32; the LNS scale s
multiplies the norm output.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRotaryEmbedding,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_mixln_llama import MixLNLlamaConfig

PRE_LIKE = ("pre", "lns", "hybrid-first")
POST_LIKE = ("post", "deepnorm", "deeppost", "residual-dual")
QKV_NORM_POSITIONS = ("hybrid", "hybrid-first")
SIAMESE_NORMS = {"post_pre": ("attn_x_layernorm", "attn_y_layernorm", "input_layernorm",
                              "mlp_x_layernorm", "mlp_y_layernorm", "post_attention_layernorm"),
                 "hybrid_pre": ("attn_y_layernorm", "mlp_x_layernorm", "mlp_y_layernorm", "post_attention_layernorm")}


class MixLNChannelScale(nn.Module):
    """SiameseNorm hybrid_pre's c1: a learnable gain per channel, weight (hidden,)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
FINAL_NORMS = {"siamese": ("x_norm", "y_norm", "out_norm"), "residual-dual": ("d_norm",)}


def _squash_or_normalize(s, dims, normalization, eps, alpha, shift):
    """fp32 s -> DyT tanh(alpha*s), Derf erf(alpha*s + shift), or s normalised over `dims` (RMS or LayerNorm)."""
    if normalization == "DyT":
        return torch.tanh(alpha.float() * s)
    if normalization == "Derf":
        return torch.erf(alpha.float() * s + shift.float())
    if normalization == "LayerNorm":
        s = s - s.mean(dims, keepdim=True)
    return s * torch.rsqrt(s.pow(2).mean(dims, keepdim=True) + eps)


class MixLNScaledEmbedding(nn.Embedding):
    """nn.Embedding whose output is multiplied by a learnable scalar embed_scale, shape (1,)
    (config.learnable_embedding_scale; DyT's LLaMA code: `self.shared(x) * self.shared_scale`). As in
    Gemma's scaled embedding, `inputs_embeds` passed to the model bypass it: scale them yourself."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = nn.Parameter(torch.full((1,), math.sqrt(embedding_dim)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


class MixLNRMSOrLayerNorm(nn.Module):
    """RMSNorm (weight), LayerNorm (weight + bias), DyT (weight, alpha, optional bias) or Derf (weight, bias,
    alpha, shift) over the last dimension, in fp32."""

    def __init__(self, hidden_size: int, eps: float, normalization: str = "RMSNorm", dyt_bias: bool = False):
        super().__init__()
        self.eps, self.normalization = eps, normalization
        self.weight = nn.Parameter(torch.ones(hidden_size))
        has_bias = normalization in ("LayerNorm", "Derf") or (normalization == "DyT" and dyt_bias)
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if has_bias else None
        self.alpha = nn.Parameter(torch.ones(1)) if normalization in ("DyT", "Derf") else None
        self.shift = nn.Parameter(torch.zeros(1)) if normalization == "Derf" else None

    def normalize(self, s: torch.Tensor) -> torch.Tensor:
        """s: fp32 (..., hidden) -> fp32 normalised, times weight (+ bias)."""
        y = _squash_or_normalize(s, (-1,), self.normalization, self.eps, self.alpha, self.shift)
        y = y * self.weight.float()
        return y + self.bias.float() if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x.float()).to(x.dtype)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}, {self.normalization}"


class MixLNQKNorm(nn.Module):
    """Norm of a q/k/v projection output (batch, seq, heads*head_dim): per head ("head", gain (head_dim,) or
    (heads, head_dim)) or over the whole projection ("full", gain (heads*head_dim,)), in fp32."""

    def __init__(self, heads: int, head_dim: int, mode: str, config):
        super().__init__()
        self.head_dim, self.mode, self.eps, self.normalization = head_dim, mode, config.rms_norm_eps, config.normalization
        shape = (heads * head_dim,) if mode == "full" else (heads, head_dim) if config.qk_norm_per_head_gain else (head_dim,)
        self.weight = nn.Parameter(torch.ones(shape))
        n = config.normalization
        has_bias = n in ("LayerNorm", "Derf") or (n == "DyT" and config.dyt_bias)
        self.bias = nn.Parameter(torch.zeros(shape)) if has_bias else None
        self.alpha = nn.Parameter(torch.ones(1)) if n in ("DyT", "Derf") else None
        self.shift = nn.Parameter(torch.zeros(1)) if n == "Derf" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.float().view(*x.shape[:-1], -1, self.head_dim)
        dims = (-2, -1) if self.mode == "full" else (-1,)
        y = _squash_or_normalize(s, dims, self.normalization, self.eps, self.alpha, self.shift)
        gain = self.weight.float().view(-1, self.head_dim) if self.weight.dim() == 1 and self.mode == "full" else self.weight.float()
        y = y * gain
        if self.bias is not None:
            y = y + self.bias.float().view(gain.shape)
        return y.reshape(x.shape).to(x.dtype)


def attach_qkv_norms(attn: nn.Module, config, position: str) -> None:
    """q_norm/k_norm (and v_norm on hybrid layers) on `attn`, applied to its projections' outputs by hooks."""
    hybrid = position in QKV_NORM_POSITIONS
    mode = "head" if hybrid else config.qk_norm
    if mode == "none":
        return
    heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads, "v": config.num_key_value_heads}
    for name in ("q", "k", "v") if hybrid else ("q", "k"):
        norm = MixLNQKNorm(heads[name], attn.head_dim, mode, config)
        setattr(attn, f"{name}_norm", norm)
        getattr(attn, f"{name}_proj").register_forward_hook(lambda module, args, out, norm=norm: norm(out))


def add_norm(x, residual, norm: MixLNRMSOrLayerNorm, residual_scale: float = 1.0, out_scale: float = 1.0):
    """(norm(a*residual + x) * s, a*residual + x), both in the promoted dtype of x and residual; sums in fp32."""
    s = x.float()
    if residual is not None:
        s = s + residual.float() * residual_scale if residual_scale != 1.0 else s + residual.float()
    y = norm.normalize(s)
    if out_scale != 1.0:
        y = y * out_scale
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return y.to(dtype), s.to(dtype)


class MixLNLlamaDecoderLayer(GradientCheckpointingLayer):
    """One layer; `config.norm_positions[layer_idx]` decides where its norms sit (see the module docstring)."""

    def __init__(self, config: MixLNLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.position = config.norm_positions[layer_idx]
        self.residual_scale = float(config.residual_scales[layer_idx])
        self.output_scale = float(config.output_scales[layer_idx])
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        attach_qkv_norms(self.self_attn, config, self.position)
        self.mlp = LlamaMLP(config)
        self.ffn_residual_after_norm = config.hybrid_ffn_residual_after_norm

        def norm():
            return MixLNRMSOrLayerNorm(config.hidden_size, config.rms_norm_eps, config.normalization, config.dyt_bias)

        self.stream_scale = 1.0 / math.sqrt(2 * config.layer_numbers[layer_idx])  # siamese: 1/sqrt(2l)
        if self.position in PRE_LIKE:
            self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        elif self.position == "hybrid":
            self.post_attention_layernorm = norm()
        elif self.position == "siamese":
            self.siamese_variant = config.siamese_variant
            for name in SIAMESE_NORMS[self.siamese_variant]:
                setattr(self, name, norm())
            if self.siamese_variant == "hybrid_pre":
                self.attn_x_scale = MixLNChannelScale(config.hidden_size)
        elif self.position in POST_LIKE + ("reordered",):
            self.post_attention_layernorm, self.post_feedforward_layernorm = norm(), norm()
        else:  # peri
            self.input_layernorm, self.post_attention_layernorm = norm(), norm()
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
        """hidden_states (batch, seq, hidden) -> (batch, seq, hidden); two-stream layers: the embedding or
        the pair (x, y) -> the pair."""
        def attn(h):
            return self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)[0]

        x, a, s = hidden_states, self.residual_scale, self.output_scale
        if self.position == "siamese":
            x, y = x if isinstance(x, tuple) else (x, x)
            if self.siamese_variant == "hybrid_pre":
                o = attn(torch.addcmul(self.attn_y_layernorm(y), self.attn_x_scale.weight, x))  # c1*x + Ny(y)
            else:
                x = self.attn_x_layernorm(x)
                o = attn(add_norm(self.attn_y_layernorm(y), x, self.input_layernorm)[0])  # Nin(x + Ny(y))
            x = add_norm(o * self.stream_scale, x, self.mlp_x_layernorm)[0]  # Nx'(x + o/c)
            y_normed, y = add_norm(o, y, self.mlp_y_layernorm)  # (Ny'(y + o), y + o)
            o = self.mlp(add_norm(y_normed, x, self.post_attention_layernorm)[0])
            return x + o * self.stream_scale, y + o
        if self.position == "residual-dual":
            x, d = x if isinstance(x, tuple) else (x, x)
            o = attn(x)
            d = d + o
            x = add_norm(o, x, self.post_attention_layernorm)[0]
            o = self.mlp(x)
            return add_norm(o, x, self.post_feedforward_layernorm)[0], d + o
        if self.position in PRE_LIKE:
            attn_out = attn(add_norm(x, None, self.input_layernorm, out_scale=s)[0])
            mlp_in, h = add_norm(attn_out, x, self.post_attention_layernorm, out_scale=s)  # h = x + attn_out
            return h + self.mlp(mlp_in)
        if self.position in POST_LIKE:
            h, _ = add_norm(attn(x), x, self.post_attention_layernorm, residual_scale=a)
            y, _ = add_norm(self.mlp(h), h, self.post_feedforward_layernorm, residual_scale=a)
            return y
        if self.position == "reordered":  # OLMo 2: the norm of each sublayer output, then the residual add
            h = x + self.post_attention_layernorm(attn(x))
            return h + self.post_feedforward_layernorm(self.mlp(h))
        if self.position == "hybrid":  # HybridNorm: q/k/v normed in attention; FFN residual after its norm
            if not self.ffn_residual_after_norm:
                h = x + attn(x)
                return add_norm(self.mlp(h), h, self.post_attention_layernorm)[0]
            u, _ = add_norm(attn(x), x, self.post_attention_layernorm)
            return u + self.mlp(u)
        attn_out = self.post_attention_layernorm(attn(self.input_layernorm(x)))
        mlp_in, h = add_norm(attn_out, x, self.pre_feedforward_layernorm)  # h = x + N(attn_out)
        return h + self.post_feedforward_layernorm(self.mlp(mlp_in))


class MixLNTwoStreamFinalNorm(nn.Module):
    """The last pair of streams -> the LM head's input: siamese Nf(Nfx(x) + Nfy(y)); residual-dual x + Nd(d)."""

    def __init__(self, config: MixLNLlamaConfig):
        super().__init__()
        self.position = config.norm_positions[0]
        for name in FINAL_NORMS[self.position]:
            setattr(self, name, MixLNRMSOrLayerNorm(config.hidden_size, config.rms_norm_eps, config.normalization,
                                                    config.dyt_bias))

    def forward(self, hidden_states):
        x, y = hidden_states if isinstance(hidden_states, tuple) else (hidden_states, hidden_states)
        if self.position == "siamese":
            return add_norm(self.y_norm(y), self.x_norm(x), self.out_norm)[0]
        return x + self.d_norm(y)


def final_norm(config: MixLNLlamaConfig) -> nn.Module:
    if not config.final_norm:
        return nn.Identity()
    if config.norm_positions and config.norm_positions[0] in FINAL_NORMS:
        return MixLNTwoStreamFinalNorm(config)
    return MixLNRMSOrLayerNorm(config.hidden_size, config.rms_norm_eps, config.normalization, config.dyt_bias)


class MixLNLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = MixLNLlamaConfig
    config: MixLNLlamaConfig
    _no_split_modules = ["MixLNLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": MixLNLlamaDecoderLayer, "attentions": LlamaAttention}


class MixLNLlamaModel(MixLNLlamaPreTrainedModel, LlamaModel):
    """LlamaModel with per-position layers and an optional RMSNorm/LayerNorm final norm; its forward is LlamaModel's."""

    def __init__(self, config: MixLNLlamaConfig):
        MixLNLlamaPreTrainedModel.__init__(self, config)  # PreTrainedModel's; LlamaModel's would build stock layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        embedding = MixLNScaledEmbedding if config.learnable_embedding_scale else nn.Embedding
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(MixLNLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = final_norm(config)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class MixLNLlamaForCausalLM(MixLNLlamaPreTrainedModel, LlamaForCausalLM):
    """LlamaForCausalLM over MixLNLlamaModel (generate, KV cache, masks, loss: all transformers' own)."""

    def __init__(self, config: MixLNLlamaConfig):
        MixLNLlamaPreTrainedModel.__init__(self, config)
        self.model = MixLNLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()


__all__ = ["MixLNLlamaForCausalLM", "MixLNLlamaModel", "MixLNLlamaPreTrainedModel"]
