"""NaN/Inf steps are skipped, not applied; loss spikes are noted.

StepGuard wraps the innermost torch optimizer's `step` -- below every DeepSpeed wrapper (ZeRO 0-3,
bf16), where the final (averaged, clipped) gradients of this rank's parameters or partitions sit.
It applies the update only if those gradients are finite on *every* rank (one all_reduce). ZeRO-1/2
and DeepSpeed's bf16 optimizers already skip a step whose norm is NaN/Inf without calling the inner
step; the guard counts that as skipped too. Either way Adam's moments and step count are untouched.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def innermost_optimizer(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (which keep it as `.optimizer`)."""
    while getattr(optimizer, "optimizer", None) is not None and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch optimizer under the DeepSpeed wrappers, found {type(optimizer).__name__}")
    return optimizer


class StepGuard:
    def __init__(self, engine):
        self.optimizer = innermost_optimizer(engine.optimizer)
        self.device = torch.device(engine.device)
        self._called = False
        self._finite = True
        inner_step = self.optimizer.step

        def guarded_step(*args, **kwargs):
            self._called = True
            bad = torch.zeros((), device=self.device)
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None and not torch.isfinite(p.grad).all():
                        bad.fill_(1.0)
                        break
            dist.all_reduce(bad)  # every rank calls the inner step, so every rank joins
            self._finite = bad.item() == 0
            if self._finite:
                return inner_step(*args, **kwargs)
            return None

        self.optimizer.step = guarded_step

    def arm(self) -> None:
        """Call right before the engine's step at the accumulation boundary."""
        self._called, self._finite = False, True

    @property
    def applied(self) -> bool:
        """Whether the last optimizer step updated the weights."""
        return self._called and self._finite


class SpikeDetector:
    """loss > factor x (bias-corrected EMA of earlier good losses) is a spike; needs a few steps of history."""

    def __init__(self, factor: float, beta: float = 0.9, warmup_steps: int = 5):
        self.factor, self.beta, self.warmup_steps = factor, beta, warmup_steps
        self.ema, self.count = 0.0, 0

    def update(self, loss: float) -> float | None:
        """Returns the running mean when `loss` is a spike, else None. Spikes do not enter the mean."""
        if not math.isfinite(loss):
            return None
        if self.factor > 0 and self.count >= self.warmup_steps:
            mean = self.ema / (1 - self.beta**self.count)
            if loss > self.factor * mean:
                return mean
        self.ema = self.beta * self.ema + (1 - self.beta) * loss
        self.count += 1
        return None

    def state_dict(self) -> dict:
        return {"ema": self.ema, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.count = float(state["ema"]), int(state["count"])
