"""Learning rate as a pure function of the step number: linear warm-up from 0, then cosine (or
linear, or constant) decay to --min-lr at --lr-decay-iters, then flat at --min-lr.

Being a function of the step (not an object with state), it resumes exactly and cannot drift from
the data: `lr_at(step)` is the LR used by optimizer step `step` (1-based).
"""
from __future__ import annotations

import math

from megatron_mixln.training.config import TrainingConfig


def lr_at(step: int, cfg: TrainingConfig) -> float:
    warmup, decay_end = cfg.lr_warmup_iters, cfg.lr_decay_iters
    if warmup > 0 and step <= warmup:
        return cfg.lr * step / warmup  # step 1 already learns (Megatron's step 0 at lr 0 wastes a batch)
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    if step >= decay_end:
        return cfg.min_lr
    progress = (step - warmup) / (decay_end - warmup)
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def set_lr(optimizer, lr: float) -> None:
    """DeepSpeed's ZeRO wrappers expose the inner optimizer's param_groups; setting them is what
    DeepSpeed's own schedulers do."""
    for group in optimizer.param_groups:
        group["lr"] = lr
