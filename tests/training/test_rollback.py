"""--rollback-on-spike: a forced LR jump makes the loss spike; the run reloads the last good checkpoint,
skips the data window it had consumed, lowers the LR and lands exactly on the curve of a run resumed
from that checkpoint at that data position. Without rollback the same jump leaves the run far off."""
import math

import pytest

from training_testlib import tiny_datasets, tiny_model, tiny_train

from megatron_mixln.training import trainer
from megatron_mixln.training.rollback import RollbackMonitor, good_checkpoint_before
from megatron_mixln.training.schedule import lr_at

BASE = dict(train_iters=16, eval_iters=0, lr=1e-2, lr_warmup_iters=0, lr_decay_style="constant", save_interval=4,
            keep_last=2, clip_grad=0.0)


def _lr_jump(monkeypatch, at_step: int, factor: float, once: bool = True):
    real = trainer.lr_at
    fired = []

    def lr_at(step, cfg):
        if step >= at_step and not (once and fired):
            fired.append(step)
            return real(step, cfg) * factor
        return real(step, cfg)

    monkeypatch.setattr(trainer, "lr_at", lr_at)


def _run(cfg):
    run = trainer.pretrain(tiny_model(), cfg, tiny_datasets(n_train=160))
    run.engine.destroy()
    return run.to_dict()


def test_rollback_recovers_onto_the_expected_curve(single_rank, monkeypatch, tmp_path):
    _lr_jump(monkeypatch, at_step=10, factor=1000.0)
    run = _run(tiny_train(**BASE, save=str(tmp_path / "a"), rollback_on_spike=1.5, rollback_patience=2,
                          rollback_lr_factor=0.5))
    steps = [h["step"] for h in run["history"]]
    # Spikes at steps 11 and 12 (the jumped update is step 10's) -> back to iter 8, data from sample 12 x 4.
    assert steps == list(range(1, 13)) + list(range(9, 17))
    assert run["train_state"]["rollbacks"] == 1 and run["train_state"]["lr_scale"] == 0.5
    assert run["train_state"]["consumed_samples"] == (12 + 8) * 4  # the window of steps 9-12 was skipped
    after = run["history"][12:]
    assert all(h["lr"] == pytest.approx(0.5 * 1e-2) for h in after)
    assert min(h["loss"] for h in run["history"][10:12]) > 1.5 * run["history"][9]["loss"]

    # The expected curve: the run without the jump, saved at step 8, resumed with the data position and LR
    # scale the rollback chose.
    monkeypatch.setattr(trainer, "lr_at", lr_at)
    _run(tiny_train(**BASE, save=str(tmp_path / "b"), exit_interval=8))
    real_load = trainer.load_checkpoint

    def load_at_skip(engine, load_dir, tag):
        ts, training = real_load(engine, load_dir, tag)
        ts.consumed_samples, ts.lr_scale = 12 * 4, 0.5
        return ts, training

    monkeypatch.setattr(trainer, "load_checkpoint", load_at_skip)
    resumed = _run(tiny_train(**BASE, load=str(tmp_path / "b")))
    assert [h["step"] for h in resumed["history"]] == list(range(9, 17))
    for got, want in zip(after, resumed["history"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7), got["step"]

    # Control: the same jump without rollback stays far above the recovered curve.
    _lr_jump(monkeypatch, at_step=10, factor=1000.0)
    monkeypatch.setattr(trainer, "load_checkpoint", real_load)
    broken = _run(tiny_train(**BASE))
    assert not math.isfinite(broken["history"][-1]["loss"]) or broken["history"][-1]["loss"] > 1.5 * after[-1]["loss"]


def test_a_persistent_spike_ends_as_diverged(single_rank, monkeypatch, tmp_path):
    _lr_jump(monkeypatch, at_step=10, factor=1000.0, once=False)
    run = _run(tiny_train(**BASE, save=str(tmp_path / "c"), rollback_on_spike=1.5, rollback_patience=2,
                          max_rollbacks=1))
    assert run["stop_reason"] == "diverged" and run["train_state"]["rollbacks"] == 1


def test_monitor_and_checkpoint_choice(tmp_path):
    m = RollbackMonitor(factor=2.0, patience=2)
    assert not any(m.update(s, 1.0) for s in range(1, 7))
    assert not m.update(7, 5.0) and m.first_spike_step == 7
    assert not m.update(8, 1.0) and not m.in_spike  # one spike alone is forgiven
    assert not m.update(9, float("nan")) and m.update(10, 9.0) and m.first_spike_step == 9
    for tag in ("iter_0000004", "iter_0000008", "iter_0000012"):
        (tmp_path / tag).mkdir()
    (tmp_path / "latest").write_text("iter_0000012")
    assert good_checkpoint_before(str(tmp_path), 11) == "iter_0000008"
    assert good_checkpoint_before(str(tmp_path), 13) == "iter_0000012"
    assert good_checkpoint_before(str(tmp_path), 4) is None


def _events(save_dir, kind):
    import json
    import os

    with open(os.path.join(save_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(ln) for ln in fh if ln.startswith("{")]
    return [r for r in recs if r.get("kind") == "event" and r.get("event") == kind]


ROLL = dict(rollback_on_spike=1.5, rollback_patience=2, rollback_lr_factor=0.5)


def test_a_bad_update_on_a_save_step_is_rolled_past(single_rank, monkeypatch, tmp_path):
    """LR x1000 at step 8, a save step: iter_8 holds the bad update (step 9 is the first to spike), so the
    rollback goes to iter_4, once, and the run recovers instead of rolling back into the fault."""
    _lr_jump(monkeypatch, at_step=8, factor=1000.0)
    save = str(tmp_path / "a")
    run = _run(tiny_train(**BASE, save=save, **ROLL))
    assert [e["tag"] for e in _events(save, "rollback")] == ["iter_0000004"]
    assert [h["step"] for h in run["history"]] == list(range(1, 11)) + list(range(5, 17))
    assert run["stop_reason"] == "done" and run["train_state"]["rollbacks"] == 1
    before = run["history"][6]["loss"]  # step 7, before the jump
    assert all(h["loss"] < 1.5 * before for h in run["history"][10:]), run["history"]


def test_preemption_mid_streak_resumes_the_streak_and_rolls_back_the_same(single_rank, monkeypatch, tmp_path):
    """A stop save inside an open spike streak prunes nothing and carries the monitor's state: the resumed
    run rolls back to the same checkpoint and lands on the uninterrupted run's curve."""
    import signal

    _lr_jump(monkeypatch, at_step=10, factor=1000.0)
    whole = _run(tiny_train(**BASE, save=str(tmp_path / "whole"), **ROLL))
    assert [e["tag"] for e in _events(str(tmp_path / "whole"), "rollback")] == ["iter_0000008"]

    _lr_jump(monkeypatch, at_step=10, factor=1000.0)
    real_step, calls = trainer.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 11:  # step 11: the first spiking step; the streak is open when the stop save runs
            import os

            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step)
    save = str(tmp_path / "cut")
    first = _run(tiny_train(**BASE, save=save, **ROLL))
    assert first["stop_reason"] == "preempted" and [h["step"] for h in first["history"]] == list(range(1, 12))
    import os

    assert {"iter_0000004", "iter_0000008", "iter_0000011"} <= set(os.listdir(save))  # nothing pruned
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = _run(tiny_train(**BASE, save=save, load=save, **ROLL))
    assert [e["tag"] for e in _events(save, "rollback")] == ["iter_0000008"]
    assert [h["step"] for h in resumed["history"]] == [12] + list(range(9, 17))
    # iter_11 (the stop save holding the spike) was deleted at the rollback; the run's own saves follow
    assert sorted(t for t in os.listdir(save) if t.startswith("iter_")) == ["iter_0000012", "iter_0000016"]
    assert resumed["train_state"] == whole["train_state"]
    for got, want in zip(resumed["history"], whole["history"][11:]):
        assert got["step"] == want["step"] and got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7)


def test_a_damaged_rollback_target_is_passed_over(single_rank, monkeypatch, tmp_path):
    """The rollback verifies its target like --load: iter_8 with one flipped bit is skipped (a warning
    names it), iter_4 is used."""
    import os

    _lr_jump(monkeypatch, at_step=10, factor=1000.0)
    save = str(tmp_path / "d")
    real_step, calls = trainer.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 11:  # iter_8 exists; the rollback comes at step 12
            tag_dir = os.path.join(save, "iter_0000008")
            name = next(f for f in sorted(os.listdir(tag_dir)) if f.endswith("model_states.pt"))
            with open(os.path.join(tag_dir, name), "r+b") as fh:
                fh.seek(os.path.getsize(os.path.join(tag_dir, name)) // 2)
                byte = fh.read(1)
                fh.seek(-1, 1)
                fh.write(bytes([byte[0] ^ 1]))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step)
    run = _run(tiny_train(**BASE, save=save, **ROLL))
    skipped = _events(save, "checkpoint_skipped")
    assert [e["tag"] for e in skipped] == ["iter_0000008"] and "checksum" in skipped[0]["problem"], skipped
    assert [e["tag"] for e in _events(save, "rollback")] == ["iter_0000004"]
    assert [h["step"] for h in run["history"]] == list(range(1, 13)) + list(range(5, 17))
