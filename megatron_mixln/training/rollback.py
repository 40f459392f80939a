"""Automatic rollback on a loss spike (--rollback-on-spike FACTOR), the PaLM/OPT recipe for divergence.

A step "spikes" when its loss is non-finite or above FACTOR x the running mean of earlier good losses
(stability.SpikeDetector: a bias-corrected EMA that spikes do not enter). After --rollback-patience
spiking steps in a row the trainer reloads the newest checkpoint saved *before* the first of them,
keeps the data position it had reached (the samples since that checkpoint -- the offending window --
are skipped, never replayed), multiplies the LR by --rollback-lr-factor and trains on. Periodic saves
are held back while a spike is under way, so the good checkpoint is not pruned.
"""
from __future__ import annotations

import math

from megatron_mixln.checkpoint.layout import list_tags, parse_tag, read_latest
from megatron_mixln.training.stability import SpikeDetector


class RollbackMonitor:
    """update(step, loss) -> True when the run should roll back now."""

    def __init__(self, factor: float, patience: int):
        self.detector = SpikeDetector(factor)
        self.patience = patience
        self.streak = 0
        self.first_spike_step: int | None = None

    def update(self, step: int, loss: float) -> bool:
        spiking = not math.isfinite(loss) or self.detector.update(loss) is not None
        if not spiking:
            self.streak, self.first_spike_step = 0, None
            return False
        if self.streak == 0:
            self.first_spike_step = step
        self.streak += 1
        return self.streak >= self.patience

    @property
    def in_spike(self) -> bool:
        return self.streak > 0

    def reset(self) -> None:
        self.streak, self.first_spike_step = 0, None


def good_checkpoint_before(save_dir: str, step: int) -> str | None:
    """The newest complete tag (at or before `latest`) whose iteration is < step, or None."""
    newest = parse_tag(read_latest(save_dir))
    if newest is None:
        return None
    for tag in reversed(list_tags(save_dir)):
        if parse_tag(tag) < step and parse_tag(tag) <= newest:
            return tag
    return None


def rollback_data_slack(cfg, global_batch_size: int) -> int:
    """Extra training samples a run may consume when rollbacks skip data windows (each window is at
    most --save-interval + --rollback-patience steps)."""
    if not cfg.rollback_on_spike:
        return 0
    return cfg.max_rollbacks * (cfg.save_interval + cfg.rollback_patience + 1) * global_batch_size
