"""Verified checkpoints: a manifest (size + xxh3-128 of every file) written last; a truncated,
bit-flipped or missing file, or a save killed with SIGKILL at several points, makes --load fall back
to the previous valid checkpoint, whose resumed loss curve equals the uninterrupted run's from
there; --tag fails instead. Also the data fingerprint (--override-data-check)."""
import json
import os
import re
import shutil
import subprocess

import pytest

from training_testlib import PYTHON, REPO, entry_env, run_and_destroy, tiny_cli_args, tiny_model, tiny_train, write_token_dataset

from megatron_mixln.manifest import MANIFEST, file_checksum
from megatron_mixln import checkpoint as ckpt
from megatron_mixln.errors import UsageError

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = dict(train_iters=6, lr_decay_iters=6, zero_stage=1, eval_iters=0, split="90,10,0")  # one LR curve, however long a run
MODEL_FILE, OPTIM_FILE = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _train(prefix, **kw):
    return run_and_destroy(tiny_model(), tiny_train(data_path=[prefix], **{**RUN, **kw}), None)


@pytest.fixture(scope="module")
def base(single_rank, tmp_path_factory):
    """The uninterrupted run, saving iter 2, 4 and 6 (all kept)."""
    root = tmp_path_factory.mktemp("verify")
    prefix = write_token_dataset(str(root / "data"))
    save = str(root / "ckpt")
    full = _train(prefix, save=save, save_interval=2, keep_last=0)
    return {"prefix": prefix, "save": save, "history": full["history"], "root": root}


def _same_curve(got, full, first_step):
    assert [h["step"] for h in got] == list(range(first_step, 7))
    want = {h["step"]: h for h in full}
    for h in got:  # same process, same files: bit-exact resume
        w = want[h["step"]]
        assert (h["loss"], h["grad_norm"], h["lr"], h["consumed_samples"]) == (w["loss"], w["grad_norm"], w["lr"], w["consumed_samples"])


def test_manifest_lists_every_file_with_size_and_checksum(base):
    tag_dir = os.path.join(base["save"], "iter_0000006")
    with open(os.path.join(tag_dir, MANIFEST)) as fh:
        manifest = json.load(fh)
    names = sorted(f for f in os.listdir(tag_dir) if f != MANIFEST)
    assert sorted(manifest["files"]) == names and {MODEL_FILE, OPTIM_FILE, "mixln_meta.json"} <= set(names)
    for name in names:
        path = os.path.join(tag_dir, name)
        assert manifest["files"][name] == {"size": os.path.getsize(path), "xxh3_128": file_checksum(path)}
    import xxhash  # the checksum is xxhash's xxh3-128 of the whole file

    with open(os.path.join(tag_dir, MODEL_FILE), "rb") as fh:
        assert manifest["files"][MODEL_FILE]["xxh3_128"] == xxhash.xxh3_128(fh.read()).hexdigest()


def _flip_byte(path):
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))


def _truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    "truncated": (MODEL_FILE, _truncate, r"mp_rank_00_model_states\.pt: \d+ bytes, the manifest says \d+ \(truncated"),
    "flipped": (OPTIM_FILE, _flip_byte, r"optim_states\.pt: xxh3_128 checksum differs from the manifest \(corrupted\)"),
    "deleted": (OPTIM_FILE, os.remove, r"optim_states\.pt: missing"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back(base, tmp_path, capsys, kind):
    name, corrupt, problem = CORRUPTIONS[kind]
    save = str(tmp_path / "ckpt")
    shutil.copytree(base["save"], save)
    corrupt(os.path.join(save, "iter_0000006", name))
    with pytest.raises(UsageError, match=rf"--load .* --tag iter_0000006: iter_0000006/.*{problem}"):
        ckpt.inspect_checkpoint(save, tiny_model(), tag="iter_0000006")
    resumed = _train(base["prefix"], load=save)
    err = capsys.readouterr().err
    assert "warning: --load" in err and "iter_0000006 is unusable" in err and "falling back to iter_0000004" in err, err
    assert re.search(problem, err), err
    _same_curve(resumed["history"], base["history"], 5)


def test_converted_checkpoint_with_another_tag_resumes_that_tag(base, tmp_path):
    """The converter writes a manifest too, and the copied mixln_meta.json naming the source tag does
    not redirect the load (the tag `latest` names is loaded)."""
    from megatron_mixln.checkpoint.convert import convert

    dst = str(tmp_path / "converted")
    convert(base["save"], dst, to="deepspeed", tag="iter_0000004", out_tag="moved")
    meta = ckpt.inspect_checkpoint(dst, tiny_model())
    assert meta["tag"] == "moved" and meta["converted"]["optimizer_states"] is False
    assert os.path.isfile(os.path.join(dst, "moved", MANIFEST))
    resumed = _train(base["prefix"], load=dst)
    assert [h["step"] for h in resumed["history"]] == [5, 6]
    assert resumed["history"][0]["loss"] == pytest.approx(base["history"][4]["loss"], rel=1e-6)  # weights only


def test_no_verify_checkpoint_still_checks_sizes(base, tmp_path):
    save = str(tmp_path / "ckpt")
    shutil.copytree(base["save"], save)
    _flip_byte(os.path.join(save, "iter_0000006", OPTIM_FILE))
    assert ckpt.inspect_checkpoint(save, tiny_model(), checksums=False)["tag"] == "iter_0000006"  # not read
    _truncate(os.path.join(save, "iter_0000006", MODEL_FILE))
    assert ckpt.inspect_checkpoint(save, tiny_model(), checksums=False)["tag"] == "iter_0000004"
    for tag in ("iter_0000004", "iter_0000002"):
        os.remove(os.path.join(save, tag, MODEL_FILE))
    with pytest.raises(UsageError, match=r"no usable checkpoint: iter_0000006/.*truncated.* \| iter_0000004/.*missing"):
        ckpt.inspect_checkpoint(save, tiny_model())


@pytest.mark.slow
@pytest.mark.parametrize("point", ["model_states", "optimizer_half", "manifest"])
def test_kill_9_during_save_resumes_from_previous_checkpoint(base, tmp_path, point):
    save = str(tmp_path / "ckpt")
    args = tiny_cli_args(base["prefix"], train_iters=6, zero_stage=1, eval_iters=0, seed=7, save=save,
                         save_interval=2, keep_last=0, wandb_mode="disabled")
    proc = subprocess.run([PYTHON, os.path.join(HERE, "checkpoint_fault_job.py"), point, *args], cwd=REPO,
                          env=entry_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert ckpt.read_latest(save) == "iter_0000002" and os.path.isdir(os.path.join(save, "iter_0000004"))
    torn = os.path.join(save, "iter_0000004")
    assert not os.path.exists(os.path.join(torn, MANIFEST))
    assert os.path.isfile(os.path.join(torn, MODEL_FILE))  # killed where the test meant to
    if point == "model_states":
        assert not os.path.exists(os.path.join(torn, OPTIM_FILE))
    else:
        half = os.path.getsize(os.path.join(torn, OPTIM_FILE)) < os.path.getsize(os.path.join(save, "iter_0000002", OPTIM_FILE))
        assert half == (point == "optimizer_half")
        assert os.path.isfile(os.path.join(torn, "mixln_meta.json")) == (point == "manifest")
    resumed = _train(base["prefix"], load=save)
    _same_curve(resumed["history"], base["history"], 3)


def test_data_fingerprint_refuses_changed_data(single_rank, tmp_path, capsys):
    prefix = write_token_dataset(str(tmp_path / "data"))
    save = str(tmp_path / "ckpt")
    _train(prefix, save=save, train_iters=2)
    meta = ckpt.inspect_checkpoint(save, tiny_model())
    assert meta["data_fingerprint"]["--data-path"]["files"][0]["idx"]["xxh3_128"] == file_checksum(prefix + ".idx")
    write_token_dataset(prefix, seed=1)  # other tokens, same document lengths: the same .idx bytes
    from megatron_mixln.training import trainer

    with pytest.raises(UsageError, match=r"trained on other data: .*data\.idx: modified since it was checkpointed "
                                         r"\(mtime; same size and hash.*data\.bin: modified.*--override-data-check"):
        trainer.pretrain(tiny_model(), tiny_train(data_path=[prefix], load=save, **{**RUN, "train_iters": 3}), None)
    resumed = _train(prefix, load=save, train_iters=3, override_data_check=True)
    assert [h["step"] for h in resumed["history"]] == [3]
    assert "resuming anyway (--override-data-check)" in capsys.readouterr().err
    write_token_dataset(prefix, n_docs=70)
    with pytest.raises(UsageError, match=r"data\.idx: \d+ bytes, \d+ when checkpointed"):
        trainer.pretrain(tiny_model(), tiny_train(data_path=[prefix], load=save, **{**RUN, "train_iters": 4}), None)


def test_flags_parse():
    from megatron_mixln.training.arguments import parse_configs

    _, cfg = parse_configs(["--load", "x", "--tag", "iter_0000002", "--no-verify-checkpoint", "--override-data-check",
                            "--hang-timeout", "600", "--exit-duration-in-mins", "230.5", "--vocab-size", "256"])
    assert (cfg.tag, cfg.verify_checkpoint, cfg.override_data_check) == ("iter_0000002", False, True)
    assert (cfg.hang_timeout, cfg.exit_duration_in_mins) == (600.0, 230.5)
    with pytest.raises(UsageError, match="--tag iter_0000002: needs --load"):
        parse_configs(["--tag", "iter_0000002"])


def test_universal_conversion_refuses_a_damaged_source(base, tmp_path):
    from megatron_mixln.checkpoint.universal import convert_to_universal

    save = str(tmp_path / "ckpt")
    shutil.copytree(base["save"], save)
    _flip_byte(os.path.join(save, "iter_0000006", OPTIM_FILE))
    with pytest.raises(ValueError, match=r"iter_0000006: does not match its manifest: .*optim_states\.pt: xxh3_128"):
        convert_to_universal(save, str(tmp_path / "universal"))
    assert not os.path.exists(tmp_path / "universal")
