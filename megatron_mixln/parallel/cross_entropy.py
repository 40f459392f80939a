"""Cross entropy over vocab-sharded logits, without ever holding full-vocabulary logits on one rank.

    loss = log(sum_v exp(z_v - m)) - (z_target - m),    m = max_v z_v

Three all-reduces over the TP group: the max (MAX), the target logit (only its owner contributes a
non-zero, SUM) and the sum of exponentials (SUM). The backward is local: softmax minus one-hot.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_mixln.parallel.mappings import reduce_from_tp
from megatron_mixln.parallel.state import get_parallel_state


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group):
        world = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        logits = logits.float()
        vocab_shard = logits.shape[-1]
        start = rank * vocab_shard

        logits_max = logits.max(dim=-1).values
        if world > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        outside = (labels < start) | (labels >= start + vocab_shard)
        local = (labels - start).masked_fill(outside, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        if world > 1:
            dist.all_reduce(target, group=group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if world > 1:
            dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target

        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        return grad * grad_loss.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, labels: torch.Tensor, group="default") -> torch.Tensor:
    """Per-token loss (same shape as `labels`, fp32) from this rank's vocabulary slice of the logits.

    `group` defaults to the TP group of `initialize_model_parallel` (None before it: one rank holds the
    whole vocabulary and this equals `F.cross_entropy(..., reduction="none")`). Labels outside
    [0, vocab) (e.g. -100 for padding) give log-sum-exp and no target term: mask them out yourself.
    """
    if group == "default":
        state = get_parallel_state()
        group = state.tp_group if state is not None and state.tp_size > 1 else None
    return _VocabParallelCrossEntropy.apply(logits_shard, labels, group)


def vocab_parallel_lm_loss(logits_shard: torch.Tensor, labels: torch.Tensor, group="default") -> torch.Tensor:
    """Mean next-token loss (the default `loss_fn` of `build_pipeline_module`, bound to its TP group)."""
    return vocab_parallel_cross_entropy(logits_shard, labels, group).mean()


def vocab_parallel_logsumexp(logits_shard: torch.Tensor, group="default") -> torch.Tensor:
    """log(sum_v exp(z_v)) over the whole vocabulary from this rank's vocab slice (batch, seq, vocab/tp)
    -> (batch, seq) fp32, differentiable (the z-loss's log Z).

    lse = m + log(sum_r sum_{v in shard r} exp(z_v - m)), m the (detached) global max: the sum over
    ranks is an all-reduce whose backward is the identity (every rank holds the same lse, so its local
    partial sum's gradient is d loss / d sum itself), as in Megatron's reduce-from-TP.
    """
    if group == "default":
        state = get_parallel_state()
        group = state.tp_group if state is not None and state.tp_size > 1 else None
    logits = logits_shard.float()
    m = logits.detach().max(dim=-1).values
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    sum_exp = (logits - m.unsqueeze(-1)).exp().sum(dim=-1)
    return m + reduce_from_tp(sum_exp, group).log()
