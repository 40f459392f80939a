"""--diagnostics-interval and --tensorboard-dir through the trainer: diagnostics records in metrics.jsonl
at the asked steps, the same loss curve as without them, TensorBoard event files that read back
(tensorboard's own EventAccumulator) equal to metrics.jsonl, and bad names refused naming the flag."""
import json
import math
import os

import pytest

from training_testlib import run_and_destroy, tiny_cli_args, tiny_datasets, tiny_model, tiny_train, write_token_dataset


def _records(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _event_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_diagnostics_logged_every_interval_without_changing_the_run(single_rank, tmp_path):
    cfg = tiny_model(num_layers=3, post_ln_layers=None, norm_position="post,pre,pre")
    plain = run_and_destroy(cfg, tiny_train(run_dir=str(tmp_path / "plain"), train_iters=4), tiny_datasets())
    probed = run_and_destroy(cfg, tiny_train(run_dir=str(tmp_path / "probed"), train_iters=4, diagnostics_interval=2,
                                             grad_norm_interval=2, tensorboard_dir=str(tmp_path / "tb")),
                             tiny_datasets())
    assert [h["loss"] for h in probed["history"]] == [h["loss"] for h in plain["history"]]
    records = _records(tmp_path / "probed")
    diag = [r for r in records if r["kind"] == "diagnostics"]
    assert [r["step"] for r in diag] == [2, 4]
    for r in diag:
        for layer in (1, 2, 3):
            tag = f"layer_{layer:02d}"
            for key in ("act_rms_in", "act_rms_out", "act_max", "act_max_over_median", "act_kurtosis",
                        "attn_logit_max", "attn_entropy", "update_ratio", "weight_norm"):
                assert math.isfinite(r[f"{key}/{tag}"]) and r[f"{key}/{tag}"] > 0, (key, tag)
            assert f"attn_entropy/{tag}/head_01" in r
        assert r["z_max"] >= r["z_mean"] > 0
        # entropy of causal attention is at most log(number of keys), averaged over positions
        assert r["attn_entropy/layer_01"] <= math.log(16)

    # TensorBoard: every numeric value of metrics.jsonl, under its kind/name tag, at its step.
    scalars = _event_scalars(str(tmp_path / "tb"))
    expected = 0
    for r in records:
        if r["kind"] == "event":
            continue
        for key, value in r.items():
            if key in ("kind", "step", "time") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            tag = key if "/" in key else f"{r['kind']}/{key}"
            assert scalars[tag][r["step"]] == pytest.approx(value, rel=1e-6), tag
            expected += 1
    assert sum(len(v) for v in scalars.values()) == expected
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "grad_norm/layer_01/attn",
            "act_rms_out/layer_03", "diagnostics/z_max", "valid/valid_loss"} <= set(scalars)


def test_unknown_diagnostic_names_the_flag(capsys, tmp_path):
    from megatron_mixln.training.main import main

    data = write_token_dataset(str(tmp_path / "tokens"))
    assert main(tiny_cli_args(data, diagnostics="activations,logit", diagnostics_interval=1)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--diagnostics: unknown 'logit'; allowed" in err, err
    assert "activations, attention, logits, updates" in err


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_reads_the_fp32_masters_or_the_weights(single_rank, tmp_path, zero_stage):
    """bf16 mode: the update ratio comes from DeepSpeed's fp32 master copy (ZeRO-2) or, where it keeps
    none (ZeRO-0), from the weights; either way a finite, positive update smaller than the weights."""
    run_and_destroy(tiny_model(), tiny_train(run_dir=str(tmp_path), train_iters=2, diagnostics_interval=1,
                                             bf16=True, zero_stage=zero_stage), tiny_datasets())
    diag = [r for r in _records(tmp_path) if r["kind"] == "diagnostics"]
    assert [r["step"] for r in diag] == [1, 2]
    for r in diag:
        for layer in (1, 2):
            assert 0 < r[f"update_ratio/layer_{layer:02d}"] < 1 and r[f"weight_norm/layer_{layer:02d}"] > 1


def test_a_preempted_run_leaves_its_events_written(single_rank, tmp_path, monkeypatch):
    """SIGUSR1 during the run: the trainer stops after the step and closes the writer, so every step's
    scalars are on disk (the writer would otherwise flush only every 30 s)."""
    import os
    import signal

    from megatron_mixln.training import trainer

    real_step, calls = trainer.train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        result = real_step(*args, **kwargs)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    summary = trainer.pretrain(tiny_model(), tiny_train(train_iters=10, tensorboard_dir=str(tmp_path / "tb")),
                               tiny_datasets())
    summary["engine"].destroy()
    assert summary["stop_reason"] == "preempted"
    assert sorted(_event_scalars(str(tmp_path / "tb"))["train/loss"]) == [1, 2, 3]
