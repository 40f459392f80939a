"""Non-finite steps are skipped (weights and Adam state untouched) and counted; too many in a row
save and stop; loss spikes are detected."""
import math

import pytest
import torch

from training_testlib import run_spawned, tiny_datasets, tiny_model, tiny_train

from megatron_mixln import checkpoint as ckpt
from megatron_mixln.training import trainer
from megatron_mixln.training.loss import token_losses
from megatron_mixln.training.stability import SpikeDetector, innermost_optimizer


def _poison(monkeypatch, bad_calls):
    """Make the training loss NaN on the given (1-based) micro-batch calls."""
    calls = []

    def loss_fn(logits, labels):
        calls.append(1)
        out = token_losses(logits, labels)
        return out * float("nan") if len(calls) in bad_calls else out

    monkeypatch.setattr(trainer, "make_token_loss_fn", lambda state=None: loss_fn)


def _weights(engine):
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.parametrize("stage", [0, 2])  # ZeRO-0: our guard skips; ZeRO-2: DeepSpeed's overflow check does
def test_nan_step_is_skipped(single_rank, monkeypatch, stage):
    base = dict(train_iters=4, eval_iters=0, zero_stage=stage)
    clean = trainer.pretrain(tiny_model(), tiny_train(exit_interval=1, **base), tiny_datasets())
    after_step1 = _weights(clean["engine"])
    clean["engine"].destroy()

    _poison(monkeypatch, bad_calls={3})  # step 2's first micro-batch (2 per step)
    run = trainer.pretrain(tiny_model(), tiny_train(exit_interval=2, **base), tiny_datasets())
    engine = run["engine"]
    assert [h["applied"] for h in run["history"]] == [True, False]
    assert math.isnan(run["history"][1]["loss"])
    assert run["train_state"]["skipped_steps"] == 1 and run["train_state"]["consumed_samples"] == 8
    for name, value in _weights(engine).items():
        assert torch.equal(value, after_step1[name]), name
    if stage == 0:
        states = innermost_optimizer(engine.optimizer).state.values()
        assert all(int(s["step"]) == 1 for s in states)  # Adam did not count the skipped step
    engine.destroy()


def test_training_continues_after_a_bad_step(single_rank, monkeypatch):
    _poison(monkeypatch, bad_calls={3})
    run = trainer.pretrain(tiny_model(), tiny_train(train_iters=4, eval_iters=0), tiny_datasets())
    run["engine"].destroy()
    assert [h["applied"] for h in run["history"]] == [True, False, True, True]
    assert all(math.isfinite(h["loss"]) for i, h in enumerate(run["history"]) if i != 1)
    assert run["stop_reason"] == "done" and run["train_state"]["bad_steps_in_a_row"] == 0


def test_too_many_bad_steps_save_and_stop(single_rank, monkeypatch, tmp_path):
    _poison(monkeypatch, bad_calls=set(range(3, 100)))
    save = str(tmp_path / "ckpt")
    run = trainer.pretrain(tiny_model(), tiny_train(train_iters=10, eval_iters=0, max_bad_steps=2, save=save),
                           tiny_datasets())
    run["engine"].destroy()
    assert run["stop_reason"] == "diverged" and len(run["history"]) == 3
    assert ckpt.read_latest(save) == "iter_0000003"
    assert ckpt.inspect_checkpoint(save, tiny_model())["train_state"]["skipped_steps"] == 2


def test_diverged_run_exits_with_a_message(monkeypatch, capsys):
    from megatron_mixln.training import main as main_mod

    monkeypatch.setattr(trainer, "pretrain", lambda m, c: {"stop_reason": "diverged"})
    assert main_mod.main(["--max-bad-steps", "4", "--hidden-size", "32", "--num-attention-heads", "2"]) == 3
    assert "4 consecutive steps had non-finite loss or gradients" in capsys.readouterr().err


def _poisoned_forward_run(**train):
    """3 steps; every forward of step 2 returns NaN (a hook on the engine's module: for the pipeline
    engine that is this rank's stage, so the NaN travels down the pipeline)."""
    real_step = trainer.train_step
    calls = []

    def step(engine, *args, **kwargs):
        calls.append(1)
        hook = engine.module.register_forward_hook(lambda m, i, out: out * float("nan")) if len(calls) == 2 else None
        try:
            return real_step(engine, *args, **kwargs)
        finally:
            if hook is not None:
                hook.remove()

    trainer.train_step = step
    try:
        run = trainer.pretrain(tiny_model(), tiny_train(train_iters=3, eval_iters=0, zero_stage=0, **train),
                               tiny_datasets())
    finally:
        trainer.train_step = real_step
    run["engine"].destroy()
    return [{k: h[k] for k in ("loss", "grad_norm", "applied")} for h in run["history"]]


def _pipeline_job(rank, world_size, tmpdir):
    return _poisoned_forward_run(pipeline_model_parallel_size=2, micro_batch_size=1)


@pytest.mark.slow
def test_pipeline_engine_skips_nan_steps_and_reports_the_grad_norm(single_rank):
    """PP=2 with ZeRO-0 fp32: the NaN step is skipped by the guard inside the pipeline engine's
    train_batch, and every step has the model's gradient norm (DeepSpeed keeps none for a plain
    fp32 optimizer), equal to the single-process run's."""
    reference = _poisoned_forward_run()
    for history in run_spawned(_pipeline_job, 2):
        assert [h["applied"] for h in history] == [h["applied"] for h in reference] == [True, False, True]
        assert math.isnan(history[1]["loss"])
        for got, want in zip(history, reference):
            if got["applied"]:
                assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
                assert got["grad_norm"] is not None and got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


def test_spike_detector():
    spikes = SpikeDetector(factor=1.5, warmup_steps=3)
    assert [spikes.update(x) for x in (4.0, 4.0, 4.0)] == [None, None, None]  # warming up
    assert spikes.update(5.0) is None  # < 1.5 x 4
    mean = spikes.update(9.0)
    assert mean is not None and 4.0 < mean < 5.0
    assert spikes.update(float("nan")) is None
    assert SpikeDetector(factor=0).update(100.0) is None
