"""Sequence parallelism: the gradient side.

Under SP each TP rank runs the norms and residual adds on its own 1/tp of the sequence (dim 1 of
our [batch, seq, hidden] activations). A norm's weight gradient is a sum over tokens, so each rank
holds only its shard's part of it; without a sum over the TP group, the TP ranks' "replicated" norm
weights drift apart and the model silently trains on partial gradients. This holds for every norm
of every position: pre/LNS input norms, Post-LN/DeepNorm norms after the residual add, Peri-LN's
four norms and the final norm; and for the bias of a row-parallel linear (o_proj, down_proj with
--add-bias-linear), added after the reduce-scatter to this rank's tokens (Megatron-LM marks it the
same way). (Without SP the norms see the full, replicated activation and their
gradients are already complete on every rank: nothing to do.)

Two ways to do the sum, pick one:
- hooks (default of `apply_tensor_parallel`): a tensor hook on each norm parameter all-reduces each
  gradient contribution before it is accumulated. It runs inside backward, before DeepSpeed's own
  gradient hooks (ZeRO-1/2 buckets, pipeline DP all-reduce) see the gradient, so the trainer calls
  nothing. Linear in the gradient, so micro-batch accumulation stays correct.
- `allreduce_sequence_parallel_grads(model, state)`: one coalesced all-reduce after backward and
  before the optimizer step. Only for loops that own `p.grad` (plain torch, DeepSpeed ZeRO-0 between
  `engine.backward` and `engine.step`); ZeRO-1/2 consume `p.grad` during backward, so use hooks there.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_mixln.model.norms import Norm
from megatron_mixln.model.two_stream import ChannelScale

# modules whose parameters are replicated over TP and applied token by token (norm gains, SiameseNorm's c1)
TOKENWISE = (Norm, ChannelScale)
from megatron_mixln.parallel.layers import RowParallelLinear
from megatron_mixln.parallel.mappings import all_reduce_sum


def _sum_over_tp_hook(group):
    def hook(grad):
        return all_reduce_sum(grad, group)

    return hook


def mark_sequence_parallel_params(module: nn.Module, state, hooks: bool = True) -> list[nn.Parameter]:
    """Mark (and optionally hook) the parameters of every `Norm` (and `ChannelScale`) in `module`, and the
    bias of every `RowParallelLinear`: `param.sequence_parallel = True`.

    Raises if any other parameter is neither TP-sharded nor a norm's: it would run on sequence shards
    with nobody summing its gradient.
    """
    marked = {}
    for m in module.modules():
        if isinstance(m, TOKENWISE):
            for p in m.parameters(recurse=False):
                marked[id(p)] = p
        elif isinstance(m, RowParallelLinear) and m.bias is not None:
            marked[id(m.bias)] = m.bias
    for name, p in module.named_parameters():
        if id(p) not in marked and not getattr(p, "tensor_model_parallel", False) and not getattr(p, "tp_partial_grad", False):
            raise RuntimeError(
                f"sequence parallelism: parameter {name} is neither tensor-parallel nor a norm's; "
                "its gradient would cover only this rank's sequence shard"
            )
    for p in marked.values():
        if getattr(p, "sequence_parallel", False):
            continue
        p.sequence_parallel = True
        if hooks:
            p.register_hook(_sum_over_tp_hook(state.tp_group))
            p.sequence_parallel_grad_hook = True
    return list(marked.values())


def mark_tp_partial_params(params, state) -> None:
    """Parameters whole on every TP rank whose gradient on each rank covers its heads only (QK-norms):
    `param.tp_partial_grad = True` and a hook that sums each gradient contribution over the TP group,
    with or without SP (always a hook: `allreduce_sequence_parallel_grads` leaves them alone)."""
    for p in params:
        if not getattr(p, "tp_partial_grad", False):
            p.tp_partial_grad = True
            p.register_hook(_sum_over_tp_hook(state.tp_group))


def sequence_parallel_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if getattr(p, "sequence_parallel", False)]


@torch.no_grad()
def allreduce_sequence_parallel_grads(model: nn.Module, state) -> None:
    """Sum the gradients of SP-marked parameters over the TP group, in one all-reduce.

    Call after backward and before the optimizer step, only when the params were marked with
    `hooks=False` (with hooks the sum already happened; summing twice would double it).
    """
    params = [p for p in sequence_parallel_params(model) if p.grad is not None]
    if any(getattr(p, "sequence_parallel_grad_hook", False) for p in params):
        raise RuntimeError(
            "allreduce_sequence_parallel_grads: these gradients are already summed by hooks "
            "(apply_tensor_parallel(..., sp_grad_hooks=True)); calling this would double them"
        )
    if not params or state.tp_size == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = all_reduce_sum(flat, state.tp_group)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
