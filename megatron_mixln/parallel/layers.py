"""Tensor-parallel linears and embedding, built from the full layers they replace.

Each keeps the replaced module's parameter names (`weight`, `bias`), so a TP model's state-dict keys are
the plain model's keys with shard-shaped values (see `sharding.py` for which dimension is split).
Biases follow Megatron-LM's tensor_parallel layers: a column-parallel bias is split with its output
rows; a row-parallel bias is replicated and added once, after the all-reduce / reduce-scatter (under
sequence parallelism it then sees only this rank's tokens, so `sequence_parallel.py` sums its gradient).
Sharded parameters carry `tensor_model_parallel = True` and `partition_dim`: DeepSpeed's gradient
clipping counts such parameters on every TP rank and replicated ones on model-parallel rank 0 only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mixln.parallel.mappings import enter_tp_region, exit_tp_region, reduce_from_tp, reduce_scatter_to_sequence


def shard_parameter(full: torch.Tensor, dim: int, tp_rank: int, tp_size: int) -> nn.Parameter:
    """This rank's contiguous 1/tp_size slice of `full` along `dim`, as a new marked Parameter."""
    if full.shape[dim] % tp_size:
        raise ValueError(f"cannot split dimension {dim} of size {full.shape[dim]} over {tp_size} TP ranks")
    if full.is_meta:
        shape = list(full.shape)
        shape[dim] //= tp_size
        data = torch.empty(shape, dtype=full.dtype, device="meta")
    else:
        data = full.detach().chunk(tp_size, dim=dim)[tp_rank].clone()
    param = nn.Parameter(data, requires_grad=full.requires_grad)
    mark_tensor_parallel(param, dim)
    return param


def mark_tensor_parallel(param: nn.Parameter, dim: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def _replicated(bias: torch.Tensor | None) -> nn.Parameter | None:
    """A row-parallel linear's bias: the whole vector on every TP rank (a new Parameter, same values)."""
    if bias is None:
        return None
    if bias.is_meta:
        return nn.Parameter(torch.empty_like(bias, device="meta"), requires_grad=bias.requires_grad)
    return nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)


class ColumnParallelLinear(nn.Module):
    """y_shard = x @ W_shard^T + b_shard, W (and the bias b, if any) split by output features (rows).

    `enter_input=False` (q/k/v, gate/up): the owning sublayer has already brought its input into the
    TP region once (see `tensor_parallel.py`), so three projections cost one collective, not three.
    `enter_input=True` (the LM head): the layer enters the region itself. The output stays sharded.
    """

    def __init__(self, weight: nn.Parameter, group, sequence_parallel: bool, enter_input: bool,
                 bias: nn.Parameter | None = None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.group, self.sequence_parallel, self.enter_input = group, sequence_parallel, enter_input

    @classmethod
    def from_linear(cls, linear: nn.Linear, state, sequence_parallel: bool, enter_input: bool = False):
        bias = None if linear.bias is None else shard_parameter(linear.bias, 0, state.tp_rank, state.tp_size)
        return cls(shard_parameter(linear.weight, 0, state.tp_rank, state.tp_size), state.tp_group,
                   sequence_parallel, enter_input, bias)

    def forward(self, x):
        if self.enter_input:
            x = enter_tp_region(x, self.group, self.sequence_parallel)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        out, inp = self.weight.shape
        return f"in_features={inp}, out_features_per_rank={out}, sequence_parallel={self.sequence_parallel}"


class RowParallelLinear(nn.Module):
    """y = sum_ranks x_shard @ W_shard^T (+ b), W split by input features (columns); the sum is an
    all-reduce, or a reduce-scatter into sequence shards under sequence parallelism. The bias b is
    replicated and added once, after the sum (adding it inside would count it tp_size times)."""

    def __init__(self, weight: nn.Parameter, group, sequence_parallel: bool, bias: nn.Parameter | None = None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.group, self.sequence_parallel = group, sequence_parallel

    @classmethod
    def from_linear(cls, linear: nn.Linear, state, sequence_parallel: bool):
        return cls(shard_parameter(linear.weight, 1, state.tp_rank, state.tp_size), state.tp_group, sequence_parallel,
                   _replicated(linear.bias))

    def forward(self, x):
        y = exit_tp_region(F.linear(x, self.weight), self.group, self.sequence_parallel)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        out, inp = self.weight.shape
        return f"in_features_per_rank={inp}, out_features={out}, sequence_parallel={self.sequence_parallel}"


class VocabParallelEmbedding(nn.Module):
    """Each TP rank owns rows [vocab_start, vocab_end) of the table; tokens outside give zeros,
    and the partial embeddings are summed (all-reduce, or reduce-scatter into sequence shards)."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, group, sequence_parallel: bool):
        super().__init__()
        self.weight = weight
        self.vocab_start, self.vocab_end = vocab_start, vocab_start + weight.shape[0]
        self.group, self.sequence_parallel = group, sequence_parallel

    @classmethod
    def from_embedding(cls, embed: nn.Embedding, state, sequence_parallel: bool):
        if embed.padding_idx is not None or embed.max_norm is not None:
            raise NotImplementedError("vocab-parallel embedding: padding_idx/max_norm are not supported")
        weight = shard_parameter(embed.weight, 0, state.tp_rank, state.tp_size)
        return cls(weight, state.tp_rank * weight.shape[0], state.tp_group, sequence_parallel)

    def forward(self, tokens):
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.group)
        return reduce_from_tp(out, self.group)

    def extra_repr(self):
        return (f"vocab=[{self.vocab_start}, {self.vocab_end}), dim={self.weight.shape[1]}, "
                f"sequence_parallel={self.sequence_parallel}")
