"""The LLaMA decoder: embedding (-> learnable scale) -> blocks (each with its own norm position) -> final norm
-> LM head."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from megatron_mixln.model.block import Block, plan_residual_handoff, resolve_stream
from megatron_mixln.model.config import ModelConfig
from megatron_mixln.model.init import init_weights, make_lm_head
from megatron_mixln.model.two_stream import ChannelScale, make_final_norm


def make_embedding_scale(config: ModelConfig) -> ChannelScale | None:
    """--learnable-embedding-scale: one learnable scalar, weight (1,), initialised to sqrt(hidden_size), that
    multiplies the embedding output (jiachenzhu/DyT other_tasks/LLaMA `x = self.shared(x) * self.shared_scale`;
    zlab-princeton/Derf's GPT-2 patch alike); None without the flag."""
    return ChannelScale(1, math.sqrt(config.hidden_size)) if config.learnable_embedding_scale else None


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # --freeze-pad-embedding: torch's padding_idx gives that row a zero gradient, so it never trains.
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size,
                                  padding_idx=config.pad_id if config.freeze_pad_embedding else None)
        self.embed_scale = make_embedding_scale(config)
        self.layers = nn.ModuleList(Block(config, n) for n in range(1, config.num_layers + 1))
        self.final_norm = make_final_norm(config)
        self.lm_head = make_lm_head(config)
        if config.cross_block_fusion:
            plan_residual_handoff(self.layers, then_norm=config.final_norm)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if not any(p.is_meta for p in self.parameters()):
            init_weights(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab).

        h = embed(tokens) (* embed_scale, a learnable scalar, with --learnable-embedding-scale).
        Between layers `h` is a tensor or, after a layer that hands off its last add, a pair (h, d)
        standing for h + d (see Block); the final norm then does that add itself. In a two-stream
        model (siamese, residual-dual) `h` is the pair of streams, which the final norms combine.
        """
        h = self.embed(tokens)
        if self.embed_scale is not None:
            h = self.embed_scale(h)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(resolve_stream(h, self.final_norm))


def build_model(config: ModelConfig, device: str | torch.device | None = None) -> Transformer:
    """Build on `device`; on "meta" no memory is used and weights are left uninitialised
    (call `model.to_empty(device=...)` then `init_weights(model)` to materialise)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return Transformer(config)


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Unique parameters (a tied head is counted once)."""
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        for m in (model.embed, model.lm_head):
            params.pop(id(m.weight), None)
    return sum(p.numel() for p in params.values())
