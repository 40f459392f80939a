"""The LR schedule against a naive, independently written formula."""
import math

import pytest

from megatron_mixln.training.config import TrainingConfig
from megatron_mixln.training.schedule import lr_at


def naive(step, peak, low, warmup, total, style):
    if step <= warmup:
        return peak * step / warmup
    if style == "constant":
        return peak
    t = min((step - warmup) / (total - warmup), 1.0)
    if style == "cosine":
        return low + (peak - low) * (1 + math.cos(math.pi * t)) / 2
    return peak - (peak - low) * t


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_schedule_matches_formula(style):
    cfg = TrainingConfig(lr=1e-3, min_lr=1e-4, lr_warmup_iters=10, train_iters=100, lr_decay_style=style)
    for step in range(1, 121):
        assert lr_at(step, cfg) == pytest.approx(naive(step, 1e-3, 1e-4, 10, 100, style), rel=1e-12, abs=1e-15)


def test_landmarks():
    cfg = TrainingConfig(lr=1e-3, lr_warmup_iters=10, train_iters=110)  # min_lr defaults to 0.1 x lr
    assert lr_at(1, cfg) == pytest.approx(1e-4)  # the first step already learns
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.55e-3)  # half way: the mean of peak and floor
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    no_warmup = TrainingConfig(lr=2e-3, train_iters=10, lr_decay_iters=5)
    assert lr_at(1, no_warmup) < 2e-3 and lr_at(5, no_warmup) == pytest.approx(2e-4) and lr_at(9, no_warmup) == 2e-4 * 1
