"""The four conjugate communication pairs of Megatron tensor/sequence parallelism, as autograd Functions.

Each forward collective has the adjoint collective as its backward:

    copy_to_tp              identity      <-> all-reduce      (entering a column-parallel region)
    reduce_from_tp          all-reduce    <-> identity        (leaving a row-parallel region)
    gather_from_sequence    all-gather    <-> reduce-scatter  (entering a column-parallel region under SP)
    reduce_scatter_to_seq   reduce-scatter<-> all-gather      (leaving a row-parallel region under SP)

Our activations are [batch, seq, hidden] (Megatron uses [seq, batch, hidden]), so the sequence
dimension is SEQ_DIM = 1. Every function is the identity when the group has one rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SEQ_DIM = 1


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Out-of-place all-reduce (the input may be saved for backward by another op)."""
    if _world(group) == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def all_gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((world * front.shape[0],) + tuple(front.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, front, group=group)
    return out.movedim(0, dim).contiguous()  # contiguous: the pipeline engine sends it as is


def reduce_scatter_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(
            f"sequence parallelism: sequence length {x.shape[dim]} is not divisible by the "
            f"tensor-parallel size {world}"
        )
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((front.shape[0] // world,) + tuple(front.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def split_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim` (no communication)."""
    world = _world(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"cannot split size {x.shape[dim]} of dim {dim} into {world} equal parts")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSequence(torch.autograd.Function):
    """All-gather the sequence shards. Backward reduce-scatters when the gathered tensor feeds
    TP-sharded work (each rank's gradient is then a partial sum over the TP group), or just keeps this
    rank's slice when the consumers are replicated (their gradients are already complete)."""

    @staticmethod
    def forward(ctx, x, group, partial_grads=True):
        ctx.group, ctx.partial_grads = group, partial_grads
        return all_gather_along(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial_grads:
            return reduce_scatter_along(grad, SEQ_DIM, ctx.group), None, None
        return split_along(grad, SEQ_DIM, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_along(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, SEQ_DIM, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    """Keep this rank's sequence chunk of a replicated tensor; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_along(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, SEQ_DIM, ctx.group), None


class _GatherFromTPLastDim(torch.autograd.Function):
    """All-gather a last-dim-sharded tensor (e.g. vocab-parallel logits); backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_along(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad):
        return split_along(grad, grad.dim() - 1, ctx.group), None


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group) if _world(group) > 1 else x


def reduce_from_tp(x, group):
    return _ReduceFromTP.apply(x, group) if _world(group) > 1 else x


def gather_from_sequence(x, group, partial_grads: bool = True):
    return _GatherFromSequence.apply(x, group, partial_grads) if _world(group) > 1 else x


def reduce_scatter_to_sequence(x, group):
    return _ReduceScatterToSequence.apply(x, group) if _world(group) > 1 else x


def scatter_to_sequence(x, group):
    return _ScatterToSequence.apply(x, group) if _world(group) > 1 else x


def gather_from_tp_last_dim(x, group):
    return _GatherFromTPLastDim.apply(x, group) if _world(group) > 1 else x


def enter_tp_region(x, group, sequence_parallel: bool):
    """Input side of a column-parallel region: the full (replicated) activation on every TP rank."""
    return gather_from_sequence(x, group) if sequence_parallel else copy_to_tp(x, group)


def exit_tp_region(x, group, sequence_parallel: bool):
    """Output side of a row-parallel region: sum the partial results (into sequence shards under SP)."""
    return reduce_scatter_to_sequence(x, group) if sequence_parallel else reduce_from_tp(x, group)
