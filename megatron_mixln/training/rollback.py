"""Automatic rollback on a loss spike (--rollback-on-spike FACTOR), the PaLM/OPT recipe for divergence.

A step "spikes" when its loss is non-finite or above FACTOR x the running mean of earlier good losses
(stability.SpikeDetector: a bias-corrected EMA that spikes do not enter). After --rollback-patience
spiking steps in a row the trainer reloads the newest checkpoint older than the first bad update,
keeps the data position it had reached (the samples since that checkpoint -- the offending window --
are skipped, never replayed), multiplies the LR by --rollback-lr-factor and trains on.

Which update is bad: step s's loss is measured on the weights that step s-1's update produced, so when
step s is the first to spike, the update of step s-1 may be the destructive one, and a checkpoint saved
at iteration s-1 (a save step) already holds it. The target is therefore the newest checkpoint with
iteration < s-1 that passes the same manifest verification as --load (a damaged one is passed over,
with a warning); it becomes `latest`, and the checkpoints newer than it (they hold the spike) are
deleted, so neither a restart nor --load's fallback can land on them. Periodic saves are held back while a spike is under way, a stop save in a streak
prunes nothing, and the monitor's state travels with the checkpoint (TrainState.monitors), so a run
preempted mid-streak resumes the streak and still rolls back past it.
"""
from __future__ import annotations

import math
import os

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

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "streak": self.streak, "first_spike_step": self.first_spike_step}

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        self.streak, self.first_spike_step = state["streak"], state["first_spike_step"]

    @property
    def first_bad_update(self) -> int | None:
        """The earliest update that may have caused the spike: the one before the first spiking step."""
        return None if self.first_spike_step is None else self.first_spike_step - 1


def checkpoints_before(save_dir: str, step: int) -> list[str]:
    """Tags (at or before `latest`) whose iteration is < step, newest first."""
    newest = parse_tag(read_latest(save_dir))
    if newest is None:
        return []
    return [tag for tag in reversed(list_tags(save_dir)) if parse_tag(tag) < step and parse_tag(tag) <= newest]


def good_checkpoint_before(save_dir: str, step: int) -> str | None:
    """The newest tag (at or before `latest`) whose iteration is < step, or None (not verified)."""
    tags = checkpoints_before(save_dir, step)
    return tags[0] if tags else None


def verified_rollback_target(save_dir: str, first_bad_update: int, checksums: bool = True) -> tuple[str | None, list]:
    """The newest checkpoint older than `first_bad_update` that passes --load's manifest verification
    (collective: every rank checks a share), and [tag, problem] for each newer one passed over."""
    from megatron_mixln.checkpoint.load import verify_checkpoint

    skipped = []
    for tag in checkpoints_before(save_dir, first_bad_update):
        problem = verify_checkpoint(save_dir, tag, checksums)
        if problem is None:
            return tag, skipped
        skipped.append([tag, problem])
    return None, skipped


def drop_abandoned(save_dir: str, target: str) -> list[str]:
    """Delete the checkpoints newer than the rollback target (they hold the spike, or came after it): left
    in place they would be --load's fallback or outlive the good ones under --keep-last. Returns their tags."""
    import shutil

    limit = parse_tag(target)
    dropped = [tag for tag in list_tags(save_dir) if parse_tag(tag) > limit]
    for tag in dropped:
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
    return dropped


def rollback_data_slack(cfg, global_batch_size: int) -> int:
    """Extra training samples a run may consume when rollbacks skip data windows (each window is at
    most --save-interval + --rollback-patience steps)."""
    if not cfg.rollback_on_spike:
        return 0
    return cfg.max_rollbacks * (cfg.save_interval + cfg.rollback_patience + 1) * global_batch_size
