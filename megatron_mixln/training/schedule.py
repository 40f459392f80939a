"""Learning rate as a pure function of the step number: linear warm-up from 0, then cosine (or
linear, or constant) decay to --min-lr at --lr-decay-iters, then flat at --min-lr.

Being a function of the step (not an object with state), it resumes exactly and cannot drift from
the data: `lr_at(step)` is the LR used by optimizer step `step` (1-based).
"""
from __future__ import annotations

import math

from megatron_mixln.checkpoint.meta import LR_SCHEDULE_FIELDS, lr_schedule_of
from megatron_mixln.errors import UsageError
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


def check_resumed_schedule(saved: dict | None, cfg: TrainingConfig, where: str) -> str | None:
    """Make a resumed run's LR curve continue the checkpoint's, as Megatron's OptimizerParamScheduler does.

    `saved`: the checkpoint's recorded schedule (mixln_meta.json "lr_schedule"; None for checkpoints that
    predate it or were imported, which are not checked). Without a difference nothing happens. With one
    (typically a larger --train-iters, which moves --lr-decay-iters and stretches the cosine mid-run):
    --use-checkpoint-opt-param-scheduler copies the checkpoint's values into `cfg`,
    --override-opt-param-scheduler keeps this run's; the change is returned as one line to print.
    Raises UsageError (one line naming the flags that differ and both ways out) when neither is given,
    or when both are.
    """
    if cfg.override_opt_param_scheduler and cfg.use_checkpoint_opt_param_scheduler:
        raise UsageError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler: give one, not both")
    if not saved:
        return None
    ours = lr_schedule_of(cfg)
    differ = [name for name in LR_SCHEDULE_FIELDS if name in saved and not _same(saved[name], ours[name])]
    if not differ:
        return None
    change = ", ".join(f"--{n.replace('_', '-')} {_shown(saved[n])} -> {_shown(ours[n])}" for n in differ)
    if cfg.use_checkpoint_opt_param_scheduler:
        for name in differ:
            setattr(cfg, name, saved[name])
        return f"{where}: --use-checkpoint-opt-param-scheduler: keeping the checkpoint's LR schedule ({change} not applied)"
    if cfg.override_opt_param_scheduler:
        return f"{where}: --override-opt-param-scheduler: the LR schedule changes at the resume step ({change})"
    raise UsageError(
        f"{where} was trained with another LR schedule ({change}); resuming would bend the LR curve mid-run: "
        "pass --use-checkpoint-opt-param-scheduler to continue the checkpoint's schedule, or "
        "--override-opt-param-scheduler to switch to this run's")


def _shown(value) -> str:
    """A flag value as a user would type it: 0.00030000000000000003 -> 0.0003."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _same(saved, ours) -> bool:
    """Equal, floats up to rounding: a default of 0.1 x --lr (0.00030000000000000003) is --min-lr 3e-4."""
    if isinstance(saved, (int, float)) and isinstance(ours, (int, float)) and not isinstance(saved, bool):
        return math.isclose(saved, ours, rel_tol=1e-9, abs_tol=0.0)
    return saved == ours
