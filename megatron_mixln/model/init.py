"""Weight initialisation (docs/paper.md#initialisation), applied after construction so meta-built models
can use it too."""
from __future__ import annotations

import math

import torch
from torch import nn

from megatron_mixln.model.norms import Norm, QKNorm
from megatron_mixln.model.positions import deepnorm_init_gain
from megatron_mixln.model.two_stream import ChannelScale

SCALED_EMBEDDING_STD = math.sqrt(2.0 / 5.0)  # the Mix-LN reference code's embedding std


def make_lm_head(config) -> nn.Linear:
    """The LM head (Megatron's output_layer): hidden -> vocab, with a bias only with --add-output-layer-bias."""
    return nn.Linear(config.hidden_size, config.vocab_size, bias=config.add_output_layer_bias)


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """N(0, std) everywhere; optional scaled embedding and scaled output projections (on
    `cfg.scaled_output_layers`: every layer with --scaled-output-init, chosen ones with
    --scaled-output-init-layers); DeepNorm layers use xavier_normal with the DeepNet gain on v, o,
    gate, up, down (q, k gain 1); residual gates = cfg.residual_gate_init; with
    --freeze-pad-embedding the padding row of the embedding is zero. Linear biases (--add-qkv-bias,
    --add-bias-linear, --add-output-layer-bias) start at zero, as Megatron-LM's; zeroing draws no random
    numbers, so from one seed a (meta-built) model with biases gets the same weights as one without."""
    cfg = model.config
    std = cfg.init_method_std
    embed_std = SCALED_EMBEDDING_STD if cfg.scaled_embedding_init else std
    scaled_out_std = std / math.sqrt(2 * cfg.num_layers)
    nn.init.normal_(model.embed.weight, 0.0, embed_std)
    if cfg.freeze_pad_embedding:
        model.embed.weight[cfg.pad_id].zero_()
    if not cfg.tie_embeddings:
        nn.init.normal_(model.lm_head.weight, 0.0, std)
    if model.lm_head.bias is not None:
        model.lm_head.bias.zero_()
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        gain = deepnorm_init_gain(block.position, cfg.num_layers)
        out_std = scaled_out_std if block.layer_number in cfg.scaled_output_layers else std
        if getattr(block, "gated", False):
            block.attn_gate.fill_(cfg.residual_gate_init)
            block.mlp_gate.fill_(cfg.residual_gate_init)
        if gain is not None:
            for lin in (attn.q_proj, attn.k_proj):
                nn.init.xavier_normal_(lin.weight, gain=1.0)
            for lin in (attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                nn.init.xavier_normal_(lin.weight, gain=gain)
        else:
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                nn.init.normal_(lin.weight, 0.0, std)
            for lin in (attn.o_proj, mlp.down_proj):
                nn.init.normal_(lin.weight, 0.0, out_std)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if lin.bias is not None:
                lin.bias.zero_()
    for m in model.modules():
        if isinstance(m, (Norm, QKNorm, ChannelScale)):  # gains 1 (SiameseNorm hybrid_pre's c1 too), biases 0
            m.reset_parameters()
