"""Can this run resume that checkpoint? The layout rules (TP x PP, ZeRO stage and DP size, precision) and
the converter command to suggest when it cannot.
"""
from __future__ import annotations

import os

from megatron_mixln.errors import UsageError


def check_resume_layout(meta: dict, load_dir: str, data_parallel_size: int, zero_stage: int,
                        tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                        bf16: bool | None = None) -> None:
    """DeepSpeed files are per TP/PP rank: the same TP x PP layout, or a converted checkpoint.
    ZeRO >= 1 shards optimizer (and for stage 3 model) states over data-parallel ranks: a
    checkpoint can only be resumed with the same stage and data-parallel size (a converted one,
    which has no optimizer states, with any). DeepSpeed's optimizer states (files and keys) also
    differ between fp32 and bf16 runs: the same --bf16 setting too. A universal checkpoint
    (tools/convert_checkpoint.py --to universal) resumes at any DP size and TP size, with ZeRO stage 1
    or 2 (from a stage 1/2 checkpoint) or 3 (from a stage 3 one)."""
    if meta.get("universal"):
        source_stage = (meta["universal"].get("source_layout") or {}).get("zero_stage")
        stages = (3,) if source_stage == 3 else (1, 2)
        if pipeline_model_parallel_size != 1 or zero_stage not in stages:
            raise UsageError(
                f"--load {load_dir} ({meta['tag']}) is a DeepSpeed universal checkpoint made from ZeRO stage "
                f"{source_stage}: it loads with --pipeline-model-parallel-size 1 and --zero-stage "
                f"{' or '.join(map(str, stages))} (this run has {pipeline_model_parallel_size} and {zero_stage})"
            )
        return
    layout = meta.get("converted") or meta
    saved_tp = layout.get("tensor_model_parallel_size", 1)
    saved_pp = layout.get("pipeline_model_parallel_size", 1)
    if (saved_tp, saved_pp) != (tensor_model_parallel_size, pipeline_model_parallel_size):
        raise UsageError(
            f"--load {load_dir} ({meta['tag']}) was written with --tensor-model-parallel-size {saved_tp} "
            f"--pipeline-model-parallel-size {saved_pp}; this run has {tensor_model_parallel_size} and "
            f"{pipeline_model_parallel_size}. Convert it first: "
            + convert_command(load_dir, tensor_model_parallel_size, pipeline_model_parallel_size)
        )
    if meta.get("converted"):
        return
    saved_bf16 = meta.get("bf16")
    if bf16 is not None and saved_bf16 is not None and saved_bf16 != bf16:
        raise UsageError(
            f"--load {load_dir} ({meta['tag']}) was written {'with' if saved_bf16 else 'without'} --bf16; this "
            f"run has {'--bf16' if bf16 else 'no --bf16'}, and DeepSpeed's optimizer states differ between the "
            "two. Resume with the same precision"
        )
    saved_dp, saved_stage = meta.get("data_parallel_size"), meta.get("zero_stage")
    if saved_stage is None or saved_dp is None:
        return
    if (saved_stage or zero_stage) and (saved_dp, saved_stage) != (data_parallel_size, zero_stage):
        raise UsageError(
            f"--load {load_dir} ({meta['tag']}) was written with ZeRO stage {saved_stage} on {saved_dp} "
            f"data-parallel ranks; this run has ZeRO stage {zero_stage} on {data_parallel_size}. Resume with the "
            "same layout, or " + _reshape_advice(meta, load_dir, saved_stage, zero_stage, tensor_model_parallel_size,
                                                 pipeline_model_parallel_size)
        )


def _reshape_advice(meta: dict, load_dir: str, saved_stage: int, zero_stage: int, tp: int, pp: int) -> str:
    """How to load a ZeRO checkpoint at another data-parallel size or stage: DeepSpeed's universal format keeps
    the optimizer states (stage 1 <-> 2, or 3 -> 3); a weights-only conversion works for any layout (a stage-3
    checkpoint needs zero_to_fp32 for that)."""
    fresh = ("consolidate its partitioned weights with DeepSpeed's zero_to_fp32 (fresh optimizer moments)"
             if saved_stage == 3 else "with fresh optimizer moments, any data-parallel size and ZeRO stage: "
             + convert_command(load_dir, tp, pp))
    if (saved_stage == 3) != (zero_stage == 3):
        return fresh
    return (f"convert it, optimizer states kept: python tools/convert_checkpoint.py --input {load_dir} --tag "
            f"{meta['tag']} --output NEW_DIR --to universal, then --load NEW_DIR (or {fresh})")


def convert_command(load_dir: str, tp: int | str, pp: int | str) -> str:
    """The converter command that makes `load_dir` loadable at TP x PP, and the --load that follows it."""
    out = os.path.normpath(load_dir) + f"_tp{tp}pp{pp}"
    return (f"python tools/convert_checkpoint.py --input {load_dir} --output {out} --to deepspeed "
            f"--tp {tp} --pp {pp}, then --load {out}")
