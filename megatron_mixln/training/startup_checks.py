"""The trainer's start-up checks of a layout from the flags alone (no process group, data or checkpoint):
run by pretrain() before anything is built, and by the memory planner (tools/estimate_memory.py), so the
planner never calls FITS a layout the trainer refuses."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_mixln.model import ModelConfig
from megatron_mixln.training.config import UsageError, gradient_accumulation_steps


@dataclass(frozen=True)
class BatchLayout:
    data_parallel_size: int
    global_batch_size: int  # samples per optimizer step, over all data-parallel ranks
    gradient_accumulation_steps: int  # micro-batches per data-parallel rank per step


def check_startup_layout(model_config: ModelConfig, world_size: int, *, tensor_model_parallel_size: int = 1,
                         pipeline_model_parallel_size: int = 1, sequence_parallel: bool = False,
                         zero_stage: int | None = None, micro_batch_size: int = 1,
                         global_batch_size: int | None = None) -> BatchLayout:
    """Every check of pretrain() that the flags decide. Raises UsageError (one line naming the flag):

    - TP x PP must divide the world; the shapes must split over TP (heads, query groups, FFN, vocabulary,
      the sequence under --sequence-parallel); pipeline stages need layers and untied embeddings;
    - DeepSpeed's pipeline engine takes ZeRO stage 0 or 1 only;
    - --freeze-pad-embedding needs TP = PP = 1; --residual-gate-layers cannot take --sequence-parallel;
    - --global-batch-size = --micro-batch-size x data-parallel size x accumulation steps.
    """
    from megatron_mixln.parallel import check_parallel_config

    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    try:
        dp = check_parallel_config(model_config, world_size, tp, pp, sequence_parallel, partition_method="parameters")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if pp > 1 and zero_stage is not None and zero_stage > 1:
        raise UsageError(f"--pipeline-model-parallel-size {pp} with --zero-stage {zero_stage}: DeepSpeed's pipeline "
                         "engine supports ZeRO stage 0 or 1 only")
    if model_config.freeze_pad_embedding and (tp > 1 or pp > 1):
        raise UsageError("--freeze-pad-embedding works with --tensor-model-parallel-size 1 and "
                         "--pipeline-model-parallel-size 1 only (the vocab-parallel embedding has no padding row)")
    if model_config.gated_layers and sequence_parallel:
        raise UsageError("--residual-gate-layers with --sequence-parallel: the gates' gradients would cover one "
                         "sequence shard; drop one of the two")
    global_batch = global_batch_size or micro_batch_size * dp
    ga = gradient_accumulation_steps(global_batch, micro_batch_size, dp)
    return BatchLayout(dp, global_batch, ga)
