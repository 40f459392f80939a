"""Bad input stops the entry point before training with exit code 2 and one line naming the flag or
file and what was expected."""
import json
import os

import pytest

from training_testlib import tiny_cli_args, write_token_dataset

from megatron_mixln.training.main import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(str(tmp_path_factory.mktemp("data") / "tokens"))


def _fails(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_missing_data_path(capsys, data):
    argv = tiny_cli_args(data)
    argv = argv[: argv.index("--data-path")]
    _fails(capsys, argv, "--data-path: required")
    _fails(capsys, tiny_cli_args(data + "_typo"), "--data-path:", "_typo.bin does not exist")


def test_output_prefix_given_as_data_path_suggests_the_dataset(capsys, tmp_path):
    """`--data-path P` after `preprocess_c4.py --output-prefix P` (which writes P_text_document)."""
    prefix = str(tmp_path / "sample_train")
    write_token_dataset(prefix + "_text_document")
    err = _fails(capsys, tiny_cli_args(prefix), f"--data-path: {prefix}.bin does not exist")
    assert err.rstrip().endswith(f"did you mean {prefix}_text_document?"), err


def test_unreadable_data_path(capsys, data, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith(".idx") else real_access(p, mode))
    _fails(capsys, tiny_cli_args(data), "--data-path:", "tokens.idx is not readable")


def test_missing_validation_data(capsys, data):
    _fails(capsys, tiny_cli_args(data, valid_data_path=data + "_nope"), "--valid-data-path:", "does not exist")
    _fails(capsys, tiny_cli_args(data, split="100,0,0"), "--split 100,0,0 of --data-path: the validation data has 0",
           "--eval-iters 1 x global batch 4 needs 4")


def test_tokenizer_vocab_mismatch(capsys, data):
    _fails(capsys, tiny_cli_args(data, tokenizer="null:1000"), "--tokenizer null:1000 has 1001 tokens",
           "--vocab-size is 256")


def test_data_made_with_a_bigger_vocab(capsys, tmp_path):
    prefix = write_token_dataset(str(tmp_path / "tokens"))
    with open(prefix + ".summary.json", "w") as fh:  # as preprocess_c4 records its tokenizer
        json.dump({"tokenizer": {"vocab_size": 1000}}, fh)
    _fails(capsys, tiny_cli_args(prefix), "1000 ids", "--vocab-size is 256")


def test_batch_sizes_that_do_not_divide(capsys, data):
    _fails(capsys, tiny_cli_args(data, global_batch_size=6, micro_batch_size=4),
           "--global-batch-size 6 is not divisible by --micro-batch-size 4 x data-parallel size 1")


def test_ds_config_contradicting_flags(capsys, data, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1}}))
    _fails(capsys, tiny_cli_args(data, deepspeed_config=path),
           f"--deepspeed-config {path}", '"train_micro_batch_size_per_gpu" is 8 but --micro-batch-size gives 2')
    _fails(capsys, tiny_cli_args(data, deepspeed_config=tmp_path / "none.json"), "none.json: no such file")


def test_load_nothing_or_another_shape(capsys, data, tmp_path):
    _fails(capsys, tiny_cli_args(data, load=tmp_path / "empty"), "--load", "empty: no such directory")
    save = str(tmp_path / "ckpt")
    assert main(tiny_cli_args(data, train_iters=1, save=save)) == 0
    capsys.readouterr()
    args = tiny_cli_args(data, train_iters=2, load=save)
    args[args.index("--hidden-size") + 1] = "64"
    _fails(capsys, args, f"--load {save} (iter_0000001) holds a different model", "--hidden-size: checkpoint 32 vs now 64")


def test_resuming_a_checkpoint_without_the_embedding_scale(capsys, data, tmp_path):
    """A DyT checkpoint written without the learnable embedding scale (as before the flag existed) resumed with
    --normalization DyT, whose default now adds the scale: refused, naming the flag that resumes it."""
    save = str(tmp_path / "ckpt")
    args = tiny_cli_args(data, train_iters=1, save=save) + ["--normalization", "DyT", "--no-learnable-embedding-scale"]
    assert main(args) == 0
    capsys.readouterr()
    _fails(capsys, tiny_cli_args(data, train_iters=2, load=save) + ["--normalization", "DyT"],
           "--learnable-embedding-scale: checkpoint False vs now True (resume it with --no-learnable-embedding-scale)")


def test_resuming_a_biased_checkpoint_names_the_bias_flags(capsys, data, tmp_path):
    """A checkpoint with linear biases (e.g. the output of convert_checkpoint.py --to rmsnorm, which turns them
    on) resumed without the flags, and a bias-free one resumed with one: one line naming each flag to give."""
    save = str(tmp_path / "ckpt")
    assert main(tiny_cli_args(data, train_iters=1, save=save) + ["--add-qkv-bias", "--add-output-layer-bias"]) == 0
    capsys.readouterr()
    _fails(capsys, tiny_cli_args(data, train_iters=2, load=save) + ["--add-qkv-bias"],
           "--add-output-layer-bias: checkpoint True vs now False (resume it with --add-output-layer-bias)")
    plain = str(tmp_path / "plain")
    assert main(tiny_cli_args(data, train_iters=1, save=plain)) == 0
    capsys.readouterr()
    _fails(capsys, tiny_cli_args(data, train_iters=2, load=plain) + ["--add-bias-linear"],
           "--add-bias-linear: checkpoint False vs now True (resume it with --no-add-bias-linear)")


def test_parallel_sizes_that_do_not_fit_the_world(capsys, data):
    _fails(capsys, tiny_cli_args(data, tensor_model_parallel_size=2),
           "--tensor-model-parallel-size=2 x --pipeline-model-parallel-size=1 = 2 does not divide the world size 1")


def test_layouts_the_planner_also_refuses(capsys, data):
    """The same start-up checks tools/estimate_memory.py runs (megatron_mixln.training.startup_checks)."""
    _fails(capsys, tiny_cli_args(data, global_batch_size=5), "--global-batch-size 5 is not divisible by "
           "--micro-batch-size 2 x data-parallel size 1 (= 2)")


def test_unknown_compile_backend(capsys, data):
    _fails(capsys, tiny_cli_args(data, compile=True, compile_backend="inductr"), "--compile-backend", "'inductr'",
           "inductor")


def test_zero3_with_pipeline_refused(capsys, data):
    _fails(capsys, tiny_cli_args(data, pipeline_model_parallel_size=2, zero_stage=3),
           "--pipeline-model-parallel-size 2 with --zero-stage 3")


def test_a_file_where_a_directory_goes_is_named(tmp_path):
    from megatron_mixln.training.config import TrainingConfig, UsageError

    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(UsageError, match=f"--tensorboard-dir {afile}: is a file; give a directory"):
        TrainingConfig(tensorboard_dir=str(afile))
