"""SIGTERM / SIGUSR1: save at the end of the current step, exit 0, and leave a loadable checkpoint."""
import json
import os
import signal
import subprocess
import time

import pytest

from training_testlib import PYTHON, REPO, entry_env, tiny_cli_args, tiny_datasets, tiny_model, tiny_train, write_token_dataset

from megatron_mixln import checkpoint as ckpt


def _last_step(metrics_path):
    if not os.path.exists(metrics_path):
        return 0
    steps = [json.loads(line)["step"] for line in open(metrics_path) if line.strip().startswith("{")]
    return max(steps, default=0)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(single_rank, tmp_path):
    prefix = write_token_dataset(str(tmp_path / "data"))
    save = str(tmp_path / "ckpt")
    cmd = [PYTHON, "-m", "megatron_mixln.pretrain", *tiny_cli_args(prefix, train_iters=100000, save=save,
                                                                   eval_interval=100000)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=entry_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while _last_step(os.path.join(save, "metrics.jsonl")) < 3:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "preemption signal (SIGTERM)" in out and "exiting cleanly" in out, out
    tag = ckpt.read_latest(save)
    stopped_at = int(tag.split("_")[1])
    assert stopped_at >= 3 and f"saved checkpoint {save}/{tag}" in out
    # Loadable: a new run resumes from it and continues.
    meta = ckpt.inspect_checkpoint(save, tiny_model())
    assert meta["train_state"]["iteration"] == stopped_at
    from megatron_mixln.training.trainer import pretrain

    summary = pretrain(tiny_model(), tiny_train(load=save, data_path=[prefix], split="90,10,0", train_iters=100000,
                                                exit_interval=stopped_at + 1), None)
    summary["engine"].destroy()
    assert [h["step"] for h in summary["history"]] == [stopped_at + 1]
    assert summary["history"][0]["consumed_samples"] == (stopped_at + 1) * 4


def test_sigusr1_mid_run_stops_after_the_step(single_rank, tmp_path, monkeypatch):
    from megatron_mixln.training import trainer

    real_step = trainer.train_step
    calls = []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        result = real_step(*args, **kwargs)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives between steps 2 and 3
        return result

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    save = str(tmp_path / "ckpt")
    summary = trainer.pretrain(tiny_model(), tiny_train(train_iters=10, save=save), tiny_datasets())
    summary["engine"].destroy()
    # The flag is read after step 3's compute and all-reduced with its loss: step 3 finishes, then save.
    assert summary["stop_reason"] == "preempted"
    assert [h["step"] for h in summary["history"]] == [1, 2, 3]
    assert ckpt.read_latest(save) == "iter_0000003"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler restored


def test_signal_during_a_step_stops_after_that_step(single_rank, tmp_path, monkeypatch):
    """The flag is read at the end of the step it arrived in, not at the start of the next one: a
    signal during step 2 saves at step 2 (no extra step inside a scheduler's grace period)."""
    from megatron_mixln.training import trainer
    from megatron_mixln.training.loss import token_losses

    calls = []

    def loss_fn(logits, labels):
        calls.append(1)
        if len(calls) == 3:  # step 2's first micro-batch (2 per step)
            os.kill(os.getpid(), signal.SIGTERM)
        return token_losses(logits, labels)

    monkeypatch.setattr(trainer, "make_token_loss_fn", lambda state=None: loss_fn)
    before = signal.getsignal(signal.SIGTERM)
    save = str(tmp_path / "ckpt")
    summary = trainer.pretrain(tiny_model(), tiny_train(train_iters=10, save=save, eval_iters=0), tiny_datasets())
    summary["engine"].destroy()
    assert summary["stop_reason"] == "preempted"
    assert [h["step"] for h in summary["history"]] == [1, 2]
    assert ckpt.read_latest(save) == "iter_0000002"
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
