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
from megatron_mixln.training.checkpoint_io import install_safe_checkpoint_engine
from megatron_mixln.training.config import TrainingConfig
from megatron_mixln.training.distributed import parallel_api
from megatron_mixln.training.ds_config import zero_stage_of


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward (non-reentrant torch.utils.checkpoint).

    The block's forward is replaced on the instance rather than wrapped in a new module, so the
    state-dict keys stay the same with and without the flag.
    """
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: torch.nn.Module, **compile_kwargs) -> None:
    """torch.compile each block separately (small graphs, compiled once and reused: all blocks of a
    position share code). nn.Module.compile works in place and keeps parameter names."""
    for block in model.layers:
        block.compile(**compile_kwargs)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linears, embeddings); none on norm gains and biases (Megatron's rule)."""
    decay, no_decay = [], []
    seen = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


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
        model = build_pipeline_module(
            model_config, state, partition_method="parameters",
            activation_checkpoint_interval=1 if cfg.recompute_activations else 0,
            sequence_parallel=cfg.sequence_parallel, seed=cfg.seed,
        )
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
            apply_compile(model)
        mpu = state.mpu if state is not None else None
    if cfg.bf16_pure:
        # The reference code's precision: weights (and so Adam's moments, created like them) in bf16 and
        # updated in place; DeepSpeed's bf16 mode stays off, so it adds no fp32 master copy.
        model.to(torch.bfloat16)
    # DeepSpeed keeps the last engine's mpu process-wide (deepspeed.utils.groups.mpu); an engine built
    # after another one in the same process (tests, notebooks) must not inherit its groups.
    from deepspeed.utils import groups as ds_groups

    ds_groups.mpu = mpu
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.weight_decay), config=ds_config, mpu=mpu
    )
    install_safe_checkpoint_engine(engine)
    return engine
