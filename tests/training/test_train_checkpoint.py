"""Checkpoints: exact resume, RNG round trip, the `latest` pointer under a crash, pruning, safe
loading, and --load errors."""
import os
import random
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from training_testlib import run_and_destroy, tiny_datasets, tiny_model, tiny_train

from megatron_mixln import checkpoint as ckpt
from megatron_mixln.checkpoint import save as ckpt_save
from megatron_mixln.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = dict(train_iters=6, zero_stage=1, eval_iters=1, eval_interval=3)


def test_stop_and_resume_matches_uninterrupted(single_rank, tmp_path):
    full = run_and_destroy(tiny_model(), tiny_train(**RUN), tiny_datasets())
    save = str(tmp_path / "ckpt")
    first = run_and_destroy(tiny_model(), tiny_train(save=save, exit_interval=3, **RUN), tiny_datasets())
    assert first["stop_reason"] == "exit_interval" and first["train_state"]["iteration"] == 3
    assert ckpt.read_latest(save) == "iter_0000003"
    second = run_and_destroy(tiny_model(), tiny_train(load=save, **RUN), tiny_datasets())
    assert [h["step"] for h in second["history"]] == [4, 5, 6]
    for a, b in zip(first["history"] + second["history"], full["history"]):
        assert a["consumed_samples"] == b["consumed_samples"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6, abs=0)
    assert second["evals"][-1]["valid_ppl"] == pytest.approx(full["evals"][-1]["valid_ppl"], rel=1e-6)


def test_rng_states_round_trip(single_rank, tmp_path):
    from megatron_mixln.training.trainer import pretrain

    summary = pretrain(tiny_model(), tiny_train(train_iters=1, eval_iters=0), tiny_datasets())
    engine = summary.engine
    state = ckpt.TrainState(iteration=1, consumed_samples=4)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_checkpoint(engine, str(tmp_path), state, tiny_model(), tiny_train(), keep_last=0)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loaded, training = ckpt.load_checkpoint(engine, str(tmp_path), "iter_0000001")
    assert loaded == state and training == tiny_train().to_dict()
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    engine.destroy()


def test_crash_before_pointer_move_keeps_previous_checkpoint(single_rank, tmp_path, monkeypatch):
    save = str(tmp_path / "ckpt")
    real_write_latest = ckpt.write_latest
    calls = []

    def dies_on_second_save(save_dir, tag):
        calls.append(tag)
        if len(calls) == 2:  # the new tag's files are all written; the process "dies" now
            raise KeyboardInterrupt("simulated kill between save and pointer move")
        real_write_latest(save_dir, tag)

    monkeypatch.setattr(ckpt_save, "write_latest", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        run_and_destroy(tiny_model(), tiny_train(save=save, save_interval=2, keep_last=0, **RUN), tiny_datasets())
    monkeypatch.setattr(ckpt_save, "write_latest", real_write_latest)
    assert calls == ["iter_0000002", "iter_0000004"]
    assert os.path.isdir(os.path.join(save, "iter_0000004"))  # the torn one exists...
    assert ckpt.read_latest(save) == "iter_0000002"  # ...but is not pointed at
    # Also tear the new checkpoint's files, as a kill mid-write would.
    for name in os.listdir(os.path.join(save, "iter_0000004")):
        with open(os.path.join(save, "iter_0000004", name), "wb") as fh:
            fh.write(b"\0" * 10)
    resumed = run_and_destroy(tiny_model(), tiny_train(load=save, **RUN), tiny_datasets())
    assert [h["step"] for h in resumed["history"]] == [3, 4, 5, 6]


def test_keep_last_prunes_old_checkpoints(single_rank, tmp_path):
    save = str(tmp_path / "ckpt")
    run_and_destroy(tiny_model(), tiny_train(save=save, save_interval=1, keep_last=2, **RUN), tiny_datasets())
    assert sorted(t for t in os.listdir(save) if t.startswith("iter_")) == ["iter_0000005", "iter_0000006"]
    assert ckpt.read_latest(save) == "iter_0000006"


def test_loading_never_unpickles(single_rank, tmp_path, monkeypatch):
    save = str(tmp_path / "ckpt")
    run_and_destroy(tiny_model(), tiny_train(save=save, **{**RUN, "train_iters": 1}), tiny_datasets())
    seen = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    run_and_destroy(tiny_model(), tiny_train(load=save, use_checkpoint_opt_param_scheduler=True,
                                             **{**RUN, "train_iters": 2}), tiny_datasets())
    assert seen and all(w is True for w in seen), seen


def test_load_errors_name_the_problem(single_rank, tmp_path):
    with pytest.raises(UsageError, match=r"--load .*nowhere: no such directory"):
        ckpt.inspect_checkpoint(str(tmp_path / "nowhere"), tiny_model())
    with pytest.raises(UsageError, match=r"no 'latest' file"):
        ckpt.inspect_checkpoint(str(tmp_path), tiny_model())
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "model.safetensors").write_bytes(b"")  # tools/convert_checkpoint.py --to plain
    with pytest.raises(UsageError, match=r"plain checkpoint \(model.safetensors\); make it a DeepSpeed one for this "
                                         r"run's TP x PP layout first: python tools/convert_checkpoint.py --input "
                                         r".*plain --output .*plain_tpTPppPP --to deepspeed --tp TP --pp PP"):
        ckpt.inspect_checkpoint(str(tmp_path / "plain"), tiny_model())
    save = str(tmp_path / "ckpt")
    run_and_destroy(tiny_model(), tiny_train(save=save, **{**RUN, "train_iters": 1}), tiny_datasets())
    with pytest.raises(UsageError, match=r"--hidden-size: checkpoint 32 vs now 64"):
        ckpt.inspect_checkpoint(save, tiny_model(hidden_size=64))
    with pytest.raises(UsageError, match=r"norm positions: checkpoint 'post,pre' vs now 'pre\*2'"):
        ckpt.inspect_checkpoint(save, tiny_model(norm_position="pre", post_ln_layers=None))
    # ...and it fails before training: pretrain raises before building anything.
    from megatron_mixln.training.trainer import pretrain

    with pytest.raises(UsageError, match="--num-layers: checkpoint 2 vs now 3"):
        pretrain(tiny_model(num_layers=3), tiny_train(load=save), tiny_datasets())


def test_resume_layout_must_match_for_partitioned_states(single_rank, tmp_path):
    save = str(tmp_path / "ckpt")
    run_and_destroy(tiny_model(), tiny_train(save=save, **{**RUN, "train_iters": 1}), tiny_datasets())  # ZeRO-1, dp 1
    meta = ckpt.inspect_checkpoint(save, tiny_model())
    assert (meta["zero_stage"], meta["data_parallel_size"]) == (1, 1)
    ckpt.check_resume_layout(meta, save, data_parallel_size=1, zero_stage=1)
    with pytest.raises(UsageError, match="written with ZeRO stage 1 on 1 data-parallel ranks; this run has ZeRO stage 1 on 2"):
        ckpt.check_resume_layout(meta, save, data_parallel_size=2, zero_stage=1)
    with pytest.raises(UsageError, match="this run has ZeRO stage 3 on 1"):
        ckpt.check_resume_layout(meta, save, data_parallel_size=1, zero_stage=3)
    # the message names this project's converter, as a command that runs as printed and whose output
    # resumes at the new size (the end-to-end resume at another DP size: tests/parallel/test_parallel_pretrain.py)
    with pytest.raises(UsageError) as err:
        ckpt.check_resume_layout(meta, save, data_parallel_size=2, zero_stage=1)
    command, load = re.search(r"(python tools/convert_checkpoint\.py [^()]*?--to deepspeed --tp 1 --pp 1), then --load "
                              r"([^\s)]+)", str(err.value)).groups()
    assert "universal-checkpoint tools" not in str(err.value)  # DeepSpeed's tools were the wrong fix
    subprocess.run([sys.executable] + shlex.split(command)[1:], cwd=ROOT, check=True, capture_output=True)
    converted = ckpt.inspect_checkpoint(load, tiny_model())
    ckpt.check_resume_layout(converted, load, data_parallel_size=2, zero_stage=1)
    with pytest.raises(UsageError, match="ZeRO stage 3 on 1 .* zero_to_fp32"):
        ckpt.check_resume_layout({**meta, "zero_stage": 3}, save, data_parallel_size=2, zero_stage=3)
    ckpt.check_resume_layout({**meta, "zero_stage": 0}, save, data_parallel_size=4, zero_stage=0)  # full states: any size


def test_resume_with_another_precision_fails_before_building(single_rank, tmp_path, monkeypatch):
    """fp32 and bf16 runs write different DeepSpeed optimizer states (files, keys): a switch is refused
    up front, not with DeepSpeed's FileNotFoundError/KeyError after the model is built."""
    save = str(tmp_path / "ckpt")
    run_and_destroy(tiny_model(), tiny_train(save=save, **{**RUN, "train_iters": 1}), tiny_datasets())
    assert ckpt.inspect_checkpoint(save, tiny_model())["bf16"] is False
    from megatron_mixln.training import trainer

    built = []
    monkeypatch.setattr(trainer, "build_model_and_optimizer", lambda *a, **k: built.append(1))
    with pytest.raises(UsageError, match=r"iter_0000001\) was written without --bf16; this run has --bf16"):
        trainer.pretrain(tiny_model(), tiny_train(load=save, bf16=True, **{**RUN, "train_iters": 2}), tiny_datasets())
    assert not built


def test_resume_with_another_lr_schedule_is_refused_or_resolved(single_rank, tmp_path, monkeypatch):
    """A larger --train-iters on resume moves --lr-decay-iters and would stretch the cosine mid-run
    (Megatron's OptimizerParamScheduler refuses it too): refused before building, unless one of the
    two flags says which schedule to follow; each choice gives the LR curve it names."""
    from megatron_mixln.training import trainer
    from megatron_mixln.training.schedule import lr_at

    save = str(tmp_path / "ckpt")
    run_and_destroy(tiny_model(), tiny_train(save=save, **RUN), tiny_datasets())  # 6 steps, decays to step 6
    assert ckpt.inspect_checkpoint(save, tiny_model())["lr_schedule"]["lr_decay_iters"] == 6
    longer = {**RUN, "train_iters": 9}
    built = []
    with monkeypatch.context() as m:
        m.setattr(trainer, "build_model_and_optimizer", lambda *a, **k: built.append(1))
        with pytest.raises(UsageError, match=r"^--load .*\(iter_0000006\) was trained with another LR schedule "
                                             r"\(--lr-decay-iters 6 -> 9\); .*--use-checkpoint-opt-param-scheduler"):
            trainer.pretrain(tiny_model(), tiny_train(load=save, **longer), tiny_datasets())
        with pytest.raises(UsageError, match="give one, not both"):
            trainer.pretrain(tiny_model(), tiny_train(load=save, override_opt_param_scheduler=True,
                                                      use_checkpoint_opt_param_scheduler=True, **longer), tiny_datasets())
    assert not built
    # the same schedule spelt out (--min-lr as typed, not 0.1 x --lr as computed) is the same schedule
    from megatron_mixln.checkpoint.meta import lr_schedule_of

    computed = lr_schedule_of(tiny_train(lr=3e-3))
    typed = tiny_train(lr=3e-3, min_lr=3e-4)
    assert computed["min_lr"] != typed.min_lr and trainer.check_resumed_schedule(computed, typed, "x") is None
    kept = run_and_destroy(tiny_model(), tiny_train(load=save, use_checkpoint_opt_param_scheduler=True, **longer),
                           tiny_datasets())
    old = tiny_train(**RUN)  # the checkpoint's curve: flat at --min-lr after step 6
    assert [h["lr"] for h in kept["history"]] == pytest.approx([lr_at(s, old) for s in (7, 8, 9)], rel=1e-12)
    new = run_and_destroy(tiny_model(), tiny_train(load=save, override_opt_param_scheduler=True, **longer),
                          tiny_datasets())
    assert [h["lr"] for h in new["history"]] == pytest.approx([lr_at(s, tiny_train(**longer)) for s in (7, 8, 9)],
                                                            rel=1e-12)
    assert new["history"][0]["lr"] > kept["history"][0]["lr"]
    # A checkpoint written before mixln_meta.json recorded the schedule: the client state's training config
    # decides, once the checkpoint is loaded (a refusal then, the checkpoint's curve with the flag)
    import json

    from megatron_mixln.manifest import describe, list_files, write_manifest
    tag_dir = os.path.join(save, "iter_0000006")
    meta_path = os.path.join(tag_dir, "mixln_meta.json")
    meta = json.load(open(meta_path))
    del meta["lr_schedule"]
    with open(meta_path, "w") as fh:
        json.dump(meta, fh)
    write_manifest(tag_dir, describe(tag_dir, [f for f in list_files(tag_dir) if f != "manifest.json"]))
    with pytest.raises(UsageError, match=r"trained with another LR schedule \(--lr-decay-iters 6 -> 9\)"):
        run_and_destroy(tiny_model(), tiny_train(load=save, **longer), tiny_datasets())
    old_kept = run_and_destroy(tiny_model(), tiny_train(load=save, use_checkpoint_opt_param_scheduler=True, **longer),
                               tiny_datasets())
    assert [h["lr"] for h in old_kept["history"]] == [h["lr"] for h in kept["history"]]
    # Megatron's spelling of the flags parses to the same fields
    from megatron_mixln.training.arguments import parse_configs
    _, cfg = parse_configs(["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"])
    assert cfg.override_opt_param_scheduler and cfg.use_checkpoint_opt_param_scheduler
