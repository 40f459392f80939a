"""Validation perplexity = exp(token-weighted mean NLL) over a fixed set of samples.

Each data-parallel rank sums the NLL and counts the tokens of its shard; one all_reduce adds them
up, so the result does not depend on the world size or on how samples fall into batches (unlike
the reference code's mean of batch means divided by batches + 1).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

from megatron_mixln.training.loss import masked_sum_and_count, split_batch, token_losses


def is_pipeline_engine(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


@torch.no_grad()
def evaluate(engine, batches: Iterable[torch.Tensor], token_loss_fn=token_losses, dp_group=None,
             pad_id: int = 0) -> dict:
    """-> {"valid_loss", "valid_ppl", "valid_tokens"}; `batches` are this rank's (micro, seq+1) tokens,
    IGNORE entries (padding, targets past --eval-tokens) left out of the NLL sum and the token count."""
    device = torch.device(engine.device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of NLL, token count]
    was_training = engine.training
    engine.eval()
    try:
        if is_pipeline_engine(engine):
            # Pipeline seam: eval_batch runs all micro-batches of one global batch through the stages and
            # returns their mean loss. Every micro-batch has the same token count (no loss mask), so
            # that mean is token-weighted too.
            batches = list(batches)
            per_call = engine.gradient_accumulation_steps()
            for start in range(0, len(batches), per_call):
                chunk = batches[start:start + per_call]
                it = iter([(b[:, :-1].to(device), b[:, 1:].to(device)) for b in chunk])
                loss = engine.eval_batch(it)
                n_tokens = sum(b[:, 1:].numel() for b in chunk)
                totals[0] += loss.detach().double().reshape(()) * n_tokens
                totals[1] += n_tokens
        else:
            for tokens in batches:
                inputs, labels, mask = split_batch(tokens.to(device), pad_id)
                total, count = masked_sum_and_count(token_loss_fn(engine(inputs), labels).double(), mask)
                totals[0] += total
                totals[1] += count
    finally:
        engine.train(was_training)
    dist.all_reduce(totals, group=dp_group)
    mean = (totals[0] / totals[1]).item()
    return {"valid_loss": mean, "valid_ppl": math.exp(min(mean, 700.0)), "valid_tokens": int(totals[1].item())}
