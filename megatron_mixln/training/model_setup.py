"""Build the model and wrap it in a DeepSpeed engine. The single place where a model comes to life.

The model is plain PyTorch; everything a run adds (tensor/pipeline parallelism, activation
checkpointing, torch.compile) is applied from outside by the small named functions below, in place,
so parameter names -- and therefore checkpoints -- do not depend on those flags.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from megatron_mixln.model import ModelConfig, build_model, init_weights
from megatron_mixln.model.block import Block
from megatron_mixln.training.config import TrainingConfig
from megatron_mixln.training.distributed import parallel_api
from megatron_mixln.training.ds_config import zero_stage_of
from megatron_mixln.training.deepspeed_patches import (install_global_grad_clipping, install_safe_checkpoint_engine,
                                                        reset_process_wide_mpu)
from megatron_mixln.training.param_groups import param_groups


def _checkpointed(forward, *args, **kwargs):
    """forward(*args) with its activations recomputed in backward. A Python frame of our own (not
    torch.utils.checkpoint's, which disables Dynamo), so that torch.compile traces through it and
    keeps the checkpoint as a region of the compiled graph."""
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def transformer_blocks(model: torch.nn.Module) -> list[Block]:
    """The transformer blocks of a plain model, or of this rank's pipeline stage."""
    return [m for m in model.modules() if isinstance(m, Block)]


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward (non-reentrant torch.utils.checkpoint).

    The block's forward is replaced on the instance rather than wrapped in a new module, so the
    state-dict keys stay the same with and without the flag. Composes with `apply_compile` in either
    order: the compiled block traces `_checkpointed` and compiles the checkpointed region.
    """
    for block in transformer_blocks(model):
        block.forward = functools.partial(_checkpointed, block.forward)


def apply_compile(model: torch.nn.Module, whole_model: bool = False, **compile_kwargs) -> int:
    """torch.compile each block separately (small graphs, compiled once and reused: all blocks of a
    position share code), or with `whole_model` the model as one graph (embedding, every block, final
    norm and head: more fusion, longer compile). nn.Module.compile works in place and keeps
    parameter names. Returns the number of blocks compiled (every block, with `whole_model`).

    With cross-block fusion a block's graph starts with the previous block's handed-off residual
    add, so the add and the first norm fuse into one Inductor kernel even across compiled blocks."""
    blocks = transformer_blocks(model)
    if whole_model:
        model.compile(**compile_kwargs)
        return len(blocks)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def compiled_block_count(model: torch.nn.Module, state=None) -> int:
    """Blocks of the whole model that run compiled (pipeline stages summed; collective over the
    pipeline group when there is one)."""
    local = sum(block._compiled_call_impl is not None for block in transformer_blocks(model))
    if state is None or state.pp_size == 1:
        return local
    import torch.distributed as dist

    params = list(model.parameters())
    total = torch.tensor([float(local)], device=params[0].device if params else "cpu")
    dist.all_reduce(total, group=state.pp_group)
    return int(total.item())


def compiled_graph_count() -> int:
    """Graphs torch.compile has produced in this process so far (Dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_loss(token_loss_fn, **compile_kwargs):
    """The per-token loss compiled on its own: Inductor fuses the fp32 upcast of the logits, the
    log-softmax and the NLL gather (forward and backward) instead of writing full-vocabulary fp32
    tensors between them -- at a 8k vocabulary on CPU, the largest single gain of --compile."""
    return torch.compile(token_loss_fn, **compile_kwargs)


def build_plain_model(model_config: ModelConfig, seed: int, ds_config: dict,
                      zero_init: bool = True) -> torch.nn.Module:
    """The whole model on this rank (or partitioned at construction under ZeRO-3), initialised from `seed`.

    Every path re-seeds right before init_weights, so ZeRO-3 and the other stages start from the
    same weights.
    """
    import deepspeed

    torch.manual_seed(seed)
    if zero_stage_of(ds_config) == 3 and zero_init:
        # Partition while building, so a 7B model never exists whole on one GPU...
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model(model_config)
        # ...but the model's own init_weights then ran on empty shards: redo it on gathered weights.
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            torch.manual_seed(seed)
            init_weights(model)
    else:
        model = build_model(model_config)
        torch.manual_seed(seed)
        init_weights(model)
    return model


def build_model_and_optimizer(model_config: ModelConfig, cfg: TrainingConfig, ds_config: dict, state=None):
    """-> DeepSpeed engine (a PipelineEngine when --pipeline-model-parallel-size > 1).

    Seam for tensor/pipeline parallelism (megatron_mixln.parallel): TP is applied to the plain model
    in place before DeepSpeed sees it; PP replaces the model by a deepspeed.pipe.PipelineModule.
    """
    import deepspeed

    if cfg.pipeline_model_parallel_size > 1:
        # A PipelineModule for this rank's stage, TP/SP applied inside; its loss defaults to the
        # vocab-parallel mean CE. It carries its own process grid, so no mpu is passed.
        build_pipeline_module = parallel_api("build_pipeline_module", "--pipeline-model-parallel-size")
        loss_fn = None
        if cfg.z_loss_weight:  # CE + z-loss; the trainer reads the z-loss terms back to log them apart
            from megatron_mixln.training.loss import PipelineZLoss

            loss_fn = PipelineZLoss(cfg.z_loss_weight, state)
        model = build_pipeline_module(
            model_config, state, loss_fn=loss_fn, partition_method="parameters",
            activation_checkpoint_interval=1 if cfg.recompute_activations else 0,
            sequence_parallel=cfg.sequence_parallel, seed=cfg.seed,
        )
        if cfg.compile:  # the stage's blocks; DeepSpeed's own recomputation calls them inside its checkpoint
            apply_compile(model, backend=cfg.compile_backend)
        mpu = None
    else:
        # Tensor parallelism shards full weights, so under TP the model is built whole (on the CPU) and
        # ZeRO-3 partitions the TP shards over the data-parallel group in deepspeed.initialize.
        model = build_plain_model(model_config, cfg.seed, ds_config, zero_init=cfg.tensor_model_parallel_size == 1)
        if cfg.tensor_model_parallel_size > 1:
            apply_tensor_parallel = parallel_api("apply_tensor_parallel", "--tensor-model-parallel-size")
            apply_tensor_parallel(model, state, cfg.sequence_parallel)
        if cfg.recompute_activations:
            apply_activation_checkpointing(model)
        if cfg.compile:
            apply_compile(model, backend=cfg.compile_backend)
        mpu = state.mpu if state is not None else None
    if cfg.bf16_pure:
        # The reference code's precision: weights (and so Adam's moments, created like them) in bf16 and
        # updated in place; DeepSpeed's bf16 mode stays off, so it adds no fp32 master copy.
        model.to(torch.bfloat16)
    reset_process_wide_mpu(mpu)  # an engine built after another in this process must not inherit its groups
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.weight_decay), config=ds_config, mpu=mpu
    )
    install_safe_checkpoint_engine(engine)
    install_global_grad_clipping(engine, state)
    return engine
