"""Next-token cross entropy. Every token counts (Megatron's default: no loss mask, EOD included),
so every micro-batch carries the same number of tokens and a mean of per-micro-batch means is the
token-weighted mean."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq, vocab) logits, (batch, seq) labels -> (batch, seq) NLL in fp32.

    With tensor parallelism the logits are a vocab shard: swap in
    megatron_mixln.parallel.vocab_parallel_cross_entropy (see make_token_loss_fn).
    """
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), reduction="none").view_as(labels)


def make_token_loss_fn(state=None):
    """Per-token loss for this run: plain CE, or the vocab-parallel one when TP > 1."""
    if state is not None and state.tp_size > 1:
        from megatron_mixln.training.distributed import parallel_api

        vocab_parallel_cross_entropy = parallel_api("vocab_parallel_cross_entropy", "--tensor-model-parallel-size")
        return lambda logits, labels: vocab_parallel_cross_entropy(logits, labels).float()
    return token_losses
