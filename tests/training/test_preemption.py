"""SIGTERM / SIGUSR1 / SIGINT (Ctrl-C): save at the end of the current step, exit 0, and leave a loadable
checkpoint; a second Ctrl-C aborts at once with exit 130."""
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
    # The trainer is appending while this polls: a last line without its newline is still being written.
    with open(metrics_path) as fh:
        steps = [json.loads(line)["step"] for line in fh if line.endswith("\n") and line.startswith("{")]
    return max(steps, default=0)


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_sigterm_saves_and_exits_cleanly(single_rank, tmp_path, signame):
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
        proc.send_signal(getattr(signal, signame))
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"preemption signal ({signame}) at iteration" in out and "exiting cleanly" in out, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    tag = ckpt.read_latest(save)
    stopped_at = int(tag.split("_")[1])
    assert stopped_at >= 3 and f"saved checkpoint {save}/{tag}" in out
    # Loadable: a new run resumes from it and continues.
    meta = ckpt.inspect_checkpoint(save, tiny_model())
    assert meta["train_state"]["iteration"] == stopped_at
    from megatron_mixln.training.trainer import pretrain

    summary = pretrain(tiny_model(), tiny_train(load=save, data_path=[prefix], split="90,10,0", train_iters=100000,
                                                exit_interval=stopped_at + 1), None)
    summary.engine.destroy()
    assert [h["step"] for h in summary.history] == [stopped_at + 1]
    assert summary.history[0]["consumed_samples"] == (stopped_at + 1) * 4


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
    summary.engine.destroy()
    # The flag is read after step 3's compute and all-reduced with its loss: step 3 finishes, then save.
    assert summary.stop_reason == "preempted"
    assert [h["step"] for h in summary.history] == [1, 2, 3]
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
    summary.engine.destroy()
    assert summary.stop_reason == "preempted"
    assert [h["step"] for h in summary.history] == [1, 2]
    assert ckpt.read_latest(save) == "iter_0000002"
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    """The first SIGINT only raises the flag (the step finishes and saves); a second one exits 130 now.
    The child reports each state it reaches; the test waits for those lines, not for time."""
    code = ("import time\n"
            "from megatron_mixln.training.signals import PreemptionFlag, install_early_handlers\n"
            "install_early_handlers()\n"
            "flag = PreemptionFlag()\n"
            "print('ready', flush=True)\n"
            "while not flag.requested: time.sleep(0.01)\n"
            "print('flag', flag.signal_name, flush=True)\n"
            "time.sleep(300)\n")
    proc = subprocess.Popen([PYTHON, "-c", code], cwd=REPO, env=entry_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline() == "flag SIGINT\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.splitlines() == ["second SIGINT: aborting without saving (exit 130); the newest complete checkpoint "
                                "is the resume point"], err


def _signal_on_rank1_only(rank, world_size, tmpdir):
    import contextlib
    import io

    from megatron_mixln.training import trainer

    real_step, calls = trainer.train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # during step 2, on rank 1 only
        return real_step(*args, **kwargs)

    trainer.train_step = step_then_signal
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = trainer.pretrain(tiny_model(), tiny_train(train_iters=10, save=os.path.join(tmpdir, "ckpt"),
                                                            eval_iters=0), tiny_datasets())
    summary.engine.destroy()
    return {"stop": summary.stop_reason, "steps": [h["step"] for h in summary.history],
            "lines": [ln for ln in out.getvalue().splitlines() if ln.startswith("preemption signal")]}


def test_a_signal_on_any_rank_is_named_by_rank_0():
    """Which rank a launcher's signal reaches first is timing; the outcome is not: every rank stops after
    the same step and rank 0's line names the signal."""
    from training_testlib import run_spawned

    results = run_spawned(_signal_on_rank1_only, 2)
    assert [r["stop"] for r in results] == ["preempted", "preempted"]
    assert results[0]["steps"] == results[1]["steps"] == [1, 2]
    assert len(results[0]["lines"]) == 1 and results[0]["lines"][0].startswith("preemption signal (SIGUSR1) at "
                                                                               "iteration 2:"), results
    assert results[1]["lines"] == []
