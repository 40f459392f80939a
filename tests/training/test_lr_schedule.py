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


def _megatron_lrs(peak, low, warmup_steps, decay_steps, style, n_steps):
    """megatron-core's own OptimizerParamScheduler, stepped once per iteration: the LR after k steps.
    (Our step k uses Megatron's value after k increments: our first step already learns.)"""
    from types import SimpleNamespace

    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = SimpleNamespace(param_groups=[{}])
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=peak, min_lr=low, lr_warmup_steps=warmup_steps,
                                    lr_decay_steps=decay_steps, lr_decay_style=style, start_wd=0.0, end_wd=0.0,
                                    wd_incr_steps=decay_steps, wd_incr_style="constant")
    out = []
    for _ in range(n_steps):
        sched.step(1)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_warmup_fraction_grid_against_megatron():
    """Every fraction 0.01..0.99 x every length 1..120: the warm-up is the nearest whole step to
    fraction x length (exact decimal arithmetic), and where that product is a whole number the whole
    schedule equals megatron-core's scheduler fed Megatron's own `lr_warmup_fraction * lr_decay_steps`."""
    from fractions import Fraction

    compared = truncation_would_fail = 0
    for i in range(1, 100):
        frac = i / 100
        for length in range(1, 121):
            cfg = TrainingConfig(lr=1e-3, min_lr=1e-4, lr_warmup_fraction=frac, train_iters=length)
            exact = Fraction(i, 100) * length
            assert abs(cfg.lr_warmup_iters - exact) <= Fraction(1, 2), (frac, length, cfg.lr_warmup_iters)
            if exact.denominator != 1:
                continue
            truncation_would_fail += int(frac * length) != exact
            if not 0 < exact < length:
                continue
            want = _megatron_lrs(1e-3, 1e-4, frac * length, length, "cosine", length + 2)
            got = [lr_at(k, cfg) for k in range(1, length + 3)]
            assert got == pytest.approx(want, rel=1e-9, abs=1e-15), (frac, length)
            compared += 1
    assert compared > 400 and truncation_would_fail >= 5  # e.g. 0.29 x 100: int() gave 28


def test_warmup_fraction_examples():
    assert TrainingConfig(train_iters=100, lr_warmup_fraction=0.29).lr_warmup_iters == 29  # int() gave 28
    assert TrainingConfig(train_iters=10, lr_warmup_fraction=0.25).lr_warmup_iters == 3  # 2.5 -> 3 (halves up)
    assert TrainingConfig(train_iters=10, lr_warmup_fraction=0.24).lr_warmup_iters == 2
    assert TrainingConfig(train_iters=1000, lr_decay_iters=400, lr_warmup_fraction=0.1).lr_warmup_iters == 40
