"""Gradient clipping by one global norm on every layout (ZeRO-0 fp32: DeepSpeed's clip replaced).

DeepSpeed's plain fp32 path (`DeepSpeedEngine.clip_fp32_gradients`, ZeRO stage 0 without bf16) counts
a non-tensor-parallel gradient only on model-parallel rank 0. Under the pipeline engine the
model-parallel group is the whole pipeline x TP grid slice, so every stage but the first drops its own
gradients from the norm and the whole model would be clipped with stage 0's norm (too large an update).
ZeRO-1/2/3 and the bf16 optimizer compute the norm
correctly themselves. Here the fp32 ZeRO-0 clip is replaced, on every layout, by
`parallel.clip_grad_norm_`: the norm of the whole model (TP shards summed, replicated norms once,
pipeline stages added), the same coefficient on every rank.
"""
from __future__ import annotations


def uses_deepspeed_fp32_clip(engine) -> bool:
    """Whether the engine clips through `clip_fp32_gradients` (ZeRO-0, fp32, no fp16)."""
    return not (engine.zero_optimization_stage() or engine.bfloat16_enabled() or engine.fp16_enabled())


def install_global_grad_clipping(engine, state=None) -> bool:
    """Shadow `engine.clip_fp32_gradients` on the instance with the global-norm clip; the norm it
    measured is kept where DeepSpeed keeps its own (`engine.get_global_grad_norm()`). Returns whether
    it was installed (only where DeepSpeed's fp32 clip would run)."""
    if not uses_deepspeed_fp32_clip(engine):
        return False
    from megatron_mixln.parallel.reductions import clip_grad_norm_

    def clip_fp32_gradients():
        engine._global_grad_norm = clip_grad_norm_(engine.module, state, engine.gradient_clipping())

    engine.clip_fp32_gradients = clip_fp32_gradients
    return True
