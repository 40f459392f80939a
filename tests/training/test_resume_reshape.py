"""Resume on another cluster shape with the optimizer states kept (DeepSpeed universal checkpoints,
megatron_mixln.checkpoint.universal): 2 ranks ZeRO-2 -> 1 rank ZeRO-1, 1 rank ZeRO-1 -> 2 ranks ZeRO-2,
2 ranks ZeRO-3 -> 1 rank ZeRO-3, and TP=2 -> TP=1; each resumed loss curve equals the uninterrupted 1-rank run's within fp32
tolerance (ZeRO-3: with each param group's own weight decay and Adam step). The 2-rank ZeRO-2 run is
stopped by --exit-duration-in-mins, which only rank 1's clock says has passed: both ranks stop, and
save, after the same step."""
import math
import os

import pytest

from training_testlib import run_and_destroy, run_spawned, tiny_datasets, tiny_model, tiny_train

from megatron_mixln.checkpoint.universal import convert_to_universal
from megatron_mixln import checkpoint as ckpt
from megatron_mixln.training.config import UsageError

RUN = dict(train_iters=6, eval_iters=0, lr_warmup_iters=1)
STOP = 3  # the interrupted runs save after this step
REL = 1e-5  # fp32: another reduction order (2 ranks vs 1, ZeRO partitions, TP all-reduces)


def _two_rank_job(rank, world_size, tmpdir, ref_ckpt):
    from megatron_mixln.training import trainer

    calls = []
    real_minutes = trainer._minutes_since

    def rank1_clock(start):  # only rank 1 is past the limit, and only from step 3's check on
        calls.append(1)
        return 1e9 if rank == 1 and len(calls) >= STOP else real_minutes(start)

    trainer._minutes_since = rank1_clock
    out = {}
    save = os.path.join(tmpdir, "zero2")
    first = run_and_destroy(tiny_model(), tiny_train(zero_stage=2, save=save, exit_duration_in_mins=60, **RUN),
                            tiny_datasets())
    trainer._minutes_since = real_minutes
    out["zero2"] = {"history": first["history"], "stop": first["stop_reason"], "latest": ckpt.read_latest(save)}
    # the 1-rank ZeRO-1 checkpoint (made by the test process) -> universal -> resumed on 2 ranks, ZeRO-2
    universal = os.path.join(tmpdir, "from_zero1")
    if rank == 0:
        convert_to_universal(ref_ckpt, universal, tag=ckpt.tag_for(STOP))
    import torch.distributed as dist

    dist.barrier()
    back = run_and_destroy(tiny_model(), tiny_train(zero_stage=2, load=universal, **RUN), tiny_datasets())
    out["back"] = back["history"]
    zero3 = os.path.join(tmpdir, "zero3")
    run_and_destroy(tiny_model(), tiny_train(zero_stage=3, save=zero3, exit_interval=STOP, **RUN), tiny_datasets())
    tp2 = os.path.join(tmpdir, "tp2")
    run_and_destroy(tiny_model(), tiny_train(zero_stage=1, tensor_model_parallel_size=2, save=tp2, exit_interval=STOP,
                                             **RUN), tiny_datasets())
    if rank == 0:  # hand the 2-rank checkpoints to the test process (tmpdir is removed after the job)
        for name in ("zero2", "zero3", "tp2"):
            convert_to_universal(os.path.join(tmpdir, name), os.path.join(ref_ckpt + "_from_" + name))
    return out


@pytest.fixture(scope="module")
def runs(single_rank, tmp_path_factory):
    ref_ckpt = str(tmp_path_factory.mktemp("reshape") / "zero1")
    ref = run_and_destroy(tiny_model(), tiny_train(zero_stage=1, save=ref_ckpt, save_interval=STOP, keep_last=0, **RUN),
                          tiny_datasets())
    two = run_spawned(_two_rank_job, 2, ref_ckpt)
    from megatron_mixln.checkpoint.convert import convert

    convert(ref_ckpt, ref_ckpt + "_from_weights", to="deepspeed", tag=ckpt.tag_for(STOP))  # optimizer states dropped
    resumed = {name: run_and_destroy(tiny_model(), tiny_train(zero_stage=1, load=ref_ckpt + "_from_" + name, **RUN),
                                     tiny_datasets())["history"] for name in ("zero2", "tp2", "weights")}
    from megatron_mixln.training.trainer import pretrain

    zero3 = pretrain(tiny_model(), tiny_train(zero_stage=3, load=ref_ckpt + "_from_zero3", **RUN), tiny_datasets())
    resumed["zero3"] = zero3["history"]
    optimizer = zero3["engine"].optimizer  # ZeRO-3: one Adam state per flat sub-group (one per param group here)
    zero3_groups = {"weight_decay": [g["weight_decay"] for g in optimizer.param_groups],
                    "step": [float(s["step"]) for s in optimizer.state.values()]}
    zero3["engine"].destroy()
    return {"ref": ref["history"], "two": two, "resumed": resumed, "ref_ckpt": ref_ckpt, "zero3_groups": zero3_groups}


def _same_curve(got, want, steps):
    assert [h["step"] for h in got] == list(steps)
    want = {h["step"]: h for h in want}
    for h in got:
        w = want[h["step"]]
        assert h["lr"] == w["lr"] and h["consumed_samples"] == w["consumed_samples"]
        assert math.isclose(h["loss"], w["loss"], rel_tol=REL), (h, w)
        assert math.isclose(h["grad_norm"], w["grad_norm"], rel_tol=10 * REL), (h, w)


@pytest.mark.slow
def test_exit_duration_stops_every_rank_at_the_same_step(runs):
    for rank_result in runs["two"]:
        first = rank_result["zero2"]
        assert first["stop"] == "exit_duration" and first["latest"] == ckpt.tag_for(STOP)
        _same_curve(first["history"], runs["ref"], range(1, STOP + 1))


@pytest.mark.slow
def test_two_ranks_zero2_resume_on_one_rank_zero1(runs):
    _same_curve(runs["resumed"]["zero2"], runs["ref"], range(STOP + 1, 7))


@pytest.mark.slow
def test_the_optimizer_states_are_what_keeps_the_curve(runs):
    """Without them (a weights-only conversion) the first resumed step matches, the next ones do not."""
    got, want = runs["resumed"]["weights"], {h["step"]: h for h in runs["ref"]}
    assert math.isclose(got[0]["loss"], want[STOP + 1]["loss"], rel_tol=REL)
    assert not math.isclose(got[1]["loss"], want[STOP + 2]["loss"], rel_tol=10 * REL), (got[1], want[STOP + 2])


@pytest.mark.slow
def test_one_rank_zero1_resume_on_two_ranks_zero2(runs):
    for rank_result in runs["two"]:
        _same_curve(rank_result["back"], runs["ref"], range(STOP + 1, 7))


@pytest.mark.slow
def test_two_ranks_zero3_resume_on_one_rank_zero3(runs):
    """The 7B configuration's stage (ZeRO-3) on half the ranks."""
    _same_curve(runs["resumed"]["zero3"], runs["ref"], range(STOP + 1, 7))


@pytest.mark.slow
def test_zero3_resume_keeps_each_param_groups_decay_and_step(runs):
    """DeepSpeed's ZeRO-3 universal loader gives every param group the first group's hyper-parameters and
    one shared Adam step tensor (megatron_mixln.checkpoint.universal.repair_zero3_universal_load): the norm
    gains' group must keep no weight decay, and 3 saved + 3 resumed updates are step 6 in each group."""
    assert runs["zero3_groups"] == {"weight_decay": [tiny_train().weight_decay, 0.0], "step": [6.0, 6.0]}


@pytest.mark.slow
def test_tp2_resume_at_tp1_with_optimizer_states(runs):
    _same_curve(runs["resumed"]["tp2"], runs["ref"], range(STOP + 1, 7))


def test_universal_needs_zero_and_no_pipeline(runs):
    meta = ckpt.inspect_checkpoint(runs["ref_ckpt"] + "_from_zero2", tiny_model())
    assert meta["universal"]["source_layout"]["data_parallel_size"] == 2
    with pytest.raises(UsageError, match=r"universal checkpoint made from ZeRO stage 2: it loads with --pipeline-model-parallel-size 1 and "
                                         r"--zero-stage 1 or 2 \(this run has 1 and 0\)"):
        ckpt.check_resume_layout(meta, "u", data_parallel_size=1, zero_stage=0)
    meta3 = ckpt.inspect_checkpoint(runs["ref_ckpt"] + "_from_zero3", tiny_model())
    with pytest.raises(UsageError, match=r"made from ZeRO stage 3: .*--zero-stage 3 \(this run has 1 and 2\)"):
        ckpt.check_resume_layout(meta3, "u", data_parallel_size=4, zero_stage=2)
    ckpt.check_resume_layout(meta3, "u", data_parallel_size=4, zero_stage=3)
    plain_meta = ckpt.inspect_checkpoint(runs["ref_ckpt"], tiny_model())
    with pytest.raises(UsageError, match=r"ZeRO stage 1 on 1 data-parallel ranks; this run has ZeRO stage 2 on 2\. .*"
                                         r"convert_checkpoint\.py --input .* --tag iter_0000006 --output NEW_DIR --to universal"):
        ckpt.check_resume_layout(plain_meta, runs["ref_ckpt"], data_parallel_size=2, zero_stage=2)


def _checkpoint_with_vocab(root, vocab: int) -> str:
    import json

    tag_dir = root / "iter_0000003"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mixln_meta.json").write_text(json.dumps({"model_config": tiny_model(vocab_size=vocab).to_dict()}))
    (root / "latest").write_text("iter_0000003")
    return str(root)


def test_the_padded_vocabulary_travels_with_the_checkpoint(tmp_path):
    """T5's 32,100 ids padded for TP=1 (multiple of 128: 32,128) stay 32,128 at TP=2, 4 and 8 (each divides it)
    instead of becoming 32,256 / 32,512 / 33,792; a TP that cannot split the rows is refused naming the ones that can."""
    from megatron_mixln.training.arguments import make_configs

    load = _checkpoint_with_vocab(tmp_path / "ckpt", 32128)
    from training_testlib import TINY_MODEL, TINY_TRAIN

    flags = {k: v for k, v in {**TINY_MODEL, **TINY_TRAIN}.items() if k != "vocab_size"}
    base = dict(flags, tokenizer="null:32099", load=load)
    for tp in (1, 2, 4, 8):
        model, _ = make_configs(dict(base, tensor_model_parallel_size=tp))
        assert model.vocab_size == 32128, tp
    with pytest.raises(UsageError, match=r"holds a vocabulary padded to 32128 rows, which "
                                         r"--tensor-model-parallel-size 3 cannot split evenly: resume with "
                                         r"--tensor-model-parallel-size 1 or 2 or 4 or 8 or 16"):
        make_configs(dict(base, tensor_model_parallel_size=3))
    # Without --load: the usual padding for this TP
    model, _ = make_configs(dict(base, load=None, tensor_model_parallel_size=2))
    assert model.vocab_size == 32256


def _tokenizer_configs(**values):
    """make_configs as the command line calls it: --tokenizer null:2100 (2,101 ids) and no --vocab-size."""
    from training_testlib import TINY_MODEL, TINY_TRAIN

    from megatron_mixln.training.arguments import make_configs

    flags = {k: v for k, v in {**TINY_MODEL, **TINY_TRAIN}.items() if k != "vocab_size"}
    return make_configs({**flags, **RUN, "tokenizer": "null:2100", "zero_stage": 1, **values})


def _tp2_from_universal(rank, world_size, tmpdir, universal):
    model, train = _tokenizer_configs(load=universal, tensor_model_parallel_size=2)
    return {"vocab": model.vocab_size, "history": run_and_destroy(model, train, tiny_datasets())["history"]}


@pytest.mark.slow
def test_tp1_universal_resumes_at_tp2_with_the_checkpoints_vocabulary(single_rank, tmp_path):
    """2,101 ids pad to 2,176 at TP 1 and to 2,304 at TP 2: the TP=2 resume keeps 2,176 (no --vocab-size by
    hand) and continues the TP=1 curve."""
    save = str(tmp_path / "tp1")
    model, train = _tokenizer_configs(save=save, save_interval=STOP, keep_last=0)
    assert model.vocab_size == 2176
    ref = run_and_destroy(model, train, tiny_datasets())
    universal = str(tmp_path / "universal")
    convert_to_universal(save, universal, tag=ckpt.tag_for(STOP))
    for result in run_spawned(_tp2_from_universal, 2, universal):
        assert result["vocab"] == 2176
        _same_curve(result["history"], ref["history"], range(STOP + 1, 7))
