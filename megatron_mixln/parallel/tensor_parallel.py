"""Apply tensor (and sequence) parallelism to a built model, in place, from outside it.

The model code is not touched: `Attention` reads its head counts from the projection shapes, so
sharded q/k/v/o make it compute its local heads. Per block:

    attn: [enter] -> q,k,v column-parallel -> local heads -> o row-parallel [exit]
    mlp:  [enter] -> gate,up column-parallel -> down row-parallel [exit]

[enter] is a forward pre-hook on the sublayer (copy-to-TP, or all-gather of the sequence under SP):
one collective for the three projections that share the input. [exit] is inside the row-parallel
linear (all-reduce, or reduce-scatter to sequence shards under SP). The norms and residual adds
around the sublayers, whatever their position, see the replicated activation (TP) or this rank's
sequence shard (SP); their parameters stay whole, and under SP their gradients are summed over the
TP group (see `sequence_parallel.py`).

QK-norms (q_norm/k_norm/v_norm inside attention) see the whole sequence but only this rank's heads:
their parameters stay whole too, each rank uses its heads' slice, and their gradients are always
summed over TP (`mark_tp_partial_params`); "full" QK-norm sums its statistics over TP as well.
"""
from __future__ import annotations

from torch import nn

from megatron_mixln.model.block import Block
from megatron_mixln.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_mixln.parallel.mappings import copy_to_tp, enter_tp_region, reduce_from_tp
from megatron_mixln.parallel.sequence_parallel import mark_sequence_parallel_params, mark_tp_partial_params


def check_tensor_parallel_config(config, tp_size: int, sequence_parallel: bool) -> None:
    """Clear start-up errors for shapes that cannot be split over `tp_size` ranks."""
    if sequence_parallel and tp_size == 1:
        raise ValueError("--sequence-parallel: needs --tensor-model-parallel-size > 1 (it splits the TP group's work)")
    if tp_size == 1:
        return
    if config.qk_norm == "full":  # one line naming the flags, before the generic head-count checks below
        for flag, heads in (("--num-attention-heads", config.num_attention_heads),
                            ("--num-query-groups", config.num_query_groups)):
            if heads % tp_size:
                raise ValueError(f"--qk-norm full: {flag}={heads} is not divisible by --tensor-model-parallel-size="
                                 f"{tp_size} (each rank must hold whole heads of the normed projection)")
    checks = (
        ("num_attention_heads", config.num_attention_heads, "query heads are split over TP"),
        ("num_query_groups", config.num_query_groups, "key/value heads are split over TP"),
        ("ffn_hidden_size", config.ffn_hidden_size, "gate/up rows and down columns are split over TP"),
        ("vocab_size", config.vocab_size, "the embedding and LM head are split by vocabulary"),
    )
    for name, value, why in checks:
        if value % tp_size:
            raise ValueError(
                f"{name}={value} is not divisible by --tensor-model-parallel-size={tp_size} ({why})"
            )
    if sequence_parallel and config.seq_length % tp_size:
        raise ValueError(
            f"seq_length={config.seq_length} is not divisible by --tensor-model-parallel-size={tp_size} "
            "(--sequence-parallel splits the sequence over TP)"
        )


def _enter_hook(group, sequence_parallel):
    def hook(module, args):
        return (enter_tp_region(args[0], group, sequence_parallel),) + tuple(args[1:])

    return hook


def parallelize_block(block: Block, state, sequence_parallel: bool) -> None:
    """Shard one transformer block in place (any norm position; the norms are left as they are)."""
    if getattr(block, "_tensor_parallel", False):
        raise RuntimeError(f"block {block.layer_number}: tensor parallelism applied twice")
    attn, mlp = block.attn, block.mlp
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), state, sequence_parallel))
    attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, state, sequence_parallel)
    for name in ("gate_proj", "up_proj"):
        setattr(mlp, name, ColumnParallelLinear.from_linear(getattr(mlp, name), state, sequence_parallel))
    mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, state, sequence_parallel)
    for sub in (attn, mlp):
        sub.register_forward_pre_hook(_enter_hook(state.tp_group, sequence_parallel))
    parallelize_qk_norms(attn, state)
    block._tensor_parallel = True


def parallelize_qk_norms(attn, state) -> None:
    """QK-norms (any mode): this rank's heads' slice of each gain; "full" statistics summed over TP by an
    all-reduce whose backward is an all-reduce (copy_to_tp then reduce_from_tp); gradients summed over TP.
    KV heads are never replicated over TP here (num_query_groups % TP == 0 is required), so the sum
    counts each head once."""
    group = state.tp_group
    norms = [n for n in (attn.q_norm, attn.k_norm, attn.v_norm) if n is not None]
    for n in norms:
        n.shard(state.tp_rank, state.tp_size, lambda t: reduce_from_tp(copy_to_tp(t, group), group))
    mark_tp_partial_params([p for n in norms for p in n.parameters()], state)


def parallelize_embedding(embed: nn.Embedding, state, sequence_parallel: bool) -> VocabParallelEmbedding:
    """Vocab-parallel embedding; under SP its output is already this rank's sequence shard."""
    return VocabParallelEmbedding.from_embedding(embed, state, sequence_parallel)


def parallelize_lm_head(lm_head: nn.Linear, state, sequence_parallel: bool) -> ColumnParallelLinear:
    """Vocab-parallel head: gathers the sequence (SP) itself; its logits stay vocab-sharded for
    `vocab_parallel_cross_entropy`."""
    return ColumnParallelLinear.from_linear(lm_head, state, sequence_parallel, enter_input=True)


def apply_tensor_parallel(model, state, sequence_parallel: bool = False, sp_grad_hooks: bool = True) -> None:
    """Shard `model` (a `Transformer`) over `state.tp_group` in place, copying this rank's slice of the
    existing full weights, so a TP model built from the same seed computes what the TP=1 model does.

    After this, `model(tokens)` returns vocab-sharded logits [batch, seq, vocab/tp] (the sequence is
    whole again: the head gathers it under SP); use `vocab_parallel_cross_entropy` for the loss.
    With `sequence_parallel`, norm gradients are summed over TP by hooks (`sp_grad_hooks=True`, works
    under any DeepSpeed engine) or by calling `allreduce_sequence_parallel_grads` after backward.
    """
    if not hasattr(model, "layers") and hasattr(model, "forward_funcs"):
        raise TypeError(
            "apply_tensor_parallel: got a pipeline module; build_pipeline_module applies tensor parallelism "
            "itself (pass sequence_parallel=... to it)"
        )
    check_tensor_parallel_config(model.config, state.tp_size, sequence_parallel)
    if state.tp_size == 1:
        return
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise NotImplementedError(
            "--tensor-model-parallel-size > 1 with --zero-stage 3: the model's weights are already "
            "partitioned by ZeRO-3 (zero.Init), so there are no full weights to shard; use ZeRO stage 0-2 with TP"
        )
    tied = model.lm_head.weight is model.embed.weight
    for block in model.layers:
        parallelize_block(block, state, sequence_parallel)
    model.embed = parallelize_embedding(model.embed, state, sequence_parallel)
    model.lm_head = parallelize_lm_head(model.lm_head, state, sequence_parallel)
    if tied:  # both are split by vocabulary rows, so the shards coincide
        model.lm_head.weight = model.embed.weight
    if sequence_parallel:
        mark_sequence_parallel_params(model, state, hooks=sp_grad_hooks)
