"""Every place the trainer patches or reaches into DeepSpeed internals: the checklist for a DeepSpeed upgrade.

Checked against deepspeed==0.19.8 (requirements.txt). Each patch is on one engine's instance (or, for the
process-wide mpu, reset before each engine), never on DeepSpeed's classes.

| What is patched | Checked with | Why | Covering test |
|---|---|---|---|
| `engine.checkpoint_engine.load` (`install_safe_checkpoint_engine`) | 0.19.8 | DeepSpeed unpickles whatever a checkpoint holds; ours loads with `weights_only=True` and DeepSpeed's three record types only | tests/training/test_train_checkpoint.py::test_loading_never_unpickles |
| `engine.clip_fp32_gradients` (`install_global_grad_clipping`) | 0.19.8 | ZeRO-0 fp32 counts a non-TP gradient only on model-parallel rank 0: under the pipeline engine the whole model was clipped with stage 0's norm | tests/training/test_layout_matrix.py::test_layout_gives_the_reference_update |
| innermost `optimizer.step` (`guard_inner_optimizer_step`, used by stability.StepGuard) | 0.19.8 | below every ZeRO/bf16 wrapper: an update with a non-finite gradient on any rank is skipped, Adam's state untouched | tests/training/test_stability.py |
| `engine._take_model_step` (`before_model_step`) | 0.19.8 | the pipeline engine's `train_batch` runs backward and step in one call; per-layer gradient norms must be read between the two | tests/parallel/test_parallel_pretrain.py::test_pretrain_parallel_layout_matches_data_parallel |
| `deepspeed.utils.groups.mpu` (`reset_process_wide_mpu`) | 0.19.8 | DeepSpeed keeps the last engine's mpu process-wide; an engine built after another in one process must not inherit its groups | tests/training/test_layout_matrix.py (several layouts in one process) |
"""
from __future__ import annotations

import contextlib

import torch

from megatron_mixln.checkpoint.io import safe_load


def install_safe_checkpoint_engine(engine) -> None:
    """Make the engine's checkpoint loads go through checkpoint.io.safe_load (saving is unchanged)."""
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)


def uses_deepspeed_fp32_clip(engine) -> bool:
    """Whether the engine clips through `clip_fp32_gradients` (ZeRO-0, fp32, no fp16)."""
    return not (engine.zero_optimization_stage() or engine.bfloat16_enabled() or engine.fp16_enabled())


def install_global_grad_clipping(engine, state=None) -> bool:
    """Shadow `engine.clip_fp32_gradients` on the instance with `parallel.clip_grad_norm_`: the norm of
    the whole model (TP shards summed, replicated norms once, pipeline stages added), the same coefficient
    on every rank. ZeRO-1/2/3 and the bf16 optimizer compute the norm correctly themselves. The norm it
    measured is kept where DeepSpeed keeps its own (`engine.get_global_grad_norm()`). Returns whether it
    was installed (only where DeepSpeed's fp32 clip would run)."""
    if not uses_deepspeed_fp32_clip(engine):
        return False
    from megatron_mixln.parallel.reductions import clip_grad_norm_

    def clip_fp32_gradients():
        engine._global_grad_norm = clip_grad_norm_(engine.module, state, engine.gradient_clipping())

    engine.clip_fp32_gradients = clip_fp32_gradients
    return True


def innermost_optimizer(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (which keep it as `.optimizer`)."""
    while getattr(optimizer, "optimizer", None) is not None and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch optimizer under the DeepSpeed wrappers, found {type(optimizer).__name__}")
    return optimizer


def guard_inner_optimizer_step(engine, on_step) -> torch.optim.Optimizer:
    """Wrap the innermost torch optimizer's `step`: `on_step(optimizer) -> bool` runs first on every rank
    (it may join a collective) and the update runs only when it returns True. Returns that optimizer."""
    optimizer = innermost_optimizer(engine.optimizer)
    inner_step = optimizer.step

    def guarded_step(*args, **kwargs):
        return inner_step(*args, **kwargs) if on_step(optimizer) else None

    optimizer.step = guarded_step
    return optimizer


@contextlib.contextmanager
def before_model_step(engine, fn):
    """Run fn inside the pipeline engine's train_batch, after its gradient reduction and before the
    update (`_take_model_step` is looked up on the instance, so shadowing it there hooks it)."""
    take_model_step = engine._take_model_step

    def hooked(*args, **kwargs):
        fn()
        return take_model_step(*args, **kwargs)

    engine._take_model_step = hooked
    try:
        yield
    finally:
        del engine._take_model_step


def reset_process_wide_mpu(mpu) -> None:
    """Set DeepSpeed's process-wide mpu (`deepspeed.utils.groups.mpu`) to this engine's (None without
    model parallelism) before `deepspeed.initialize`."""
    from deepspeed.utils import groups as ds_groups

    ds_groups.mpu = mpu
