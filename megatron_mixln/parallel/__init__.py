"""Tensor, sequence and pipeline parallelism applied to the model from outside (see
docs/parallelism.md).

    state = initialize_model_parallel(tp, pp)                  # groups in Megatron rank order
    apply_tensor_parallel(model, state, sequence_parallel)     # PP=1: shard a built Transformer in place
    pipe = build_pipeline_module(config, state, loss_fn, ...)  # PP>1: DeepSpeed PipelineModule, TP inside
    loss = vocab_parallel_cross_entropy(logits_shard, labels)  # per-token loss from vocab-sharded logits
    deepspeed.initialize(model=..., mpu=state.mpu, config=check_deepspeed_config(cfg, state, sp))
"""
from megatron_mixln.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_lm_loss
from megatron_mixln.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_mixln.parallel.mappings import SEQ_DIM, gather_from_tp_last_dim
from megatron_mixln.parallel.pipeline import (
    EmbeddingPipe, HeadPipe, build_pipeline_module, check_deepspeed_config, check_pipeline_config,
    init_stage_like_full_model, pipeline_layer_grad_norms, stage_partition,
)
from megatron_mixln.parallel.reductions import clip_grad_norm_, global_grad_norm, global_num_parameters
from megatron_mixln.parallel.sequence_parallel import allreduce_sequence_parallel_grads, mark_sequence_parallel_params
from megatron_mixln.parallel.sharding import merge_tp, split_tp, tp_partition_dim
from megatron_mixln.parallel.state import (
    ModelParallelUnit, ParallelState, check_parallel_sizes, destroy_model_parallel, get_parallel_state,
    initialize_model_parallel,
)
from megatron_mixln.parallel.state_dicts import (
    gather_plain_tensors, load_plain_state_dict, local_plain_state_dict, tensor_parallel_grad_getter,
)
from megatron_mixln.parallel.tensor_parallel import apply_tensor_parallel, check_tensor_parallel_config


def check_parallel_config(model_config, world_size: int, tensor_model_parallel_size: int = 1,
                          pipeline_model_parallel_size: int = 1, sequence_parallel: bool = False,
                          partition_method: str = "parameters") -> int:
    """Every start-up check of a layout, without any process group; returns the data-parallel size."""
    dp = check_parallel_sizes(world_size, tensor_model_parallel_size, pipeline_model_parallel_size)
    check_tensor_parallel_config(model_config, tensor_model_parallel_size, sequence_parallel)
    check_pipeline_config(model_config, pipeline_model_parallel_size, partition_method)
    if pipeline_model_parallel_size > 1:
        stage_partition(model_config, pipeline_model_parallel_size, partition_method)
    return dp


__all__ = [
    "ParallelState", "ModelParallelUnit", "initialize_model_parallel", "get_parallel_state", "destroy_model_parallel",
    "check_parallel_sizes", "check_parallel_config", "check_tensor_parallel_config", "check_pipeline_config",
    "check_deepspeed_config", "apply_tensor_parallel", "allreduce_sequence_parallel_grads",
    "mark_sequence_parallel_params", "vocab_parallel_cross_entropy", "vocab_parallel_lm_loss",
    "build_pipeline_module", "pipeline_layer_grad_norms", "init_stage_like_full_model", "stage_partition", "EmbeddingPipe", "HeadPipe",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "SEQ_DIM", "gather_from_tp_last_dim",
    "tp_partition_dim", "split_tp", "merge_tp", "load_plain_state_dict", "local_plain_state_dict",
    "gather_plain_tensors", "tensor_parallel_grad_getter", "global_num_parameters", "global_grad_norm", "clip_grad_norm_",
]
