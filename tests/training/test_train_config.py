"""TrainingConfig validation, batch-size derivation, and the CLI: config file < flags, presets,
vocab padding from the tokenizer."""
import json

import pytest

from megatron_mixln.training.arguments import build_parser, padded_vocab_size, parse_configs
from megatron_mixln.errors import UsageError
from megatron_mixln.training.config import TrainingConfig, gradient_accumulation_steps


def test_gradient_accumulation_is_derived():
    assert gradient_accumulation_steps(512, 8, 4) == 16
    assert gradient_accumulation_steps(8, 8, 1) == 1


@pytest.mark.parametrize("global_batch, micro, dp", [(10, 4, 1), (512, 8, 3), (4, 8, 1)])
def test_gradient_accumulation_errors_name_the_flags(global_batch, micro, dp):
    with pytest.raises(UsageError, match=rf"--global-batch-size {global_batch} is not divisible by "
                                         rf"--micro-batch-size {micro} x data-parallel size {dp}"):
        gradient_accumulation_steps(global_batch, micro, dp)


@pytest.mark.parametrize("kwargs, match", [
    (dict(micro_batch_size=0), "--micro-batch-size: must be > 0"),
    (dict(optimizer="sgd"), "--optimizer: unknown 'sgd'"),
    (dict(optimizer="adam", weight_decay=0.1), "--weight-decay 0.1 with --optimizer adam"),
    (dict(lr=1e-3, min_lr=1e-2), "--min-lr 0.01 is larger than --lr 0.001"),
    (dict(lr_warmup_iters=5, lr_warmup_fraction=0.1), "give one, not both"),
    (dict(train_iters=10, lr_warmup_iters=20), "--lr-warmup-iters 20 is longer than the decay"),
    (dict(lr_decay_style="step"), "--lr-decay-style: unknown"),
    (dict(sequence_parallel=True), "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (dict(pipeline_model_parallel_size=2, zero_stage=2), "ZeRO stage 0 or 1 only"),
    (dict(zero_stage=4), "--zero-stage: must be 0, 1, 2 or 3"),
    (dict(adam_beta2=1.0), "--adam-beta2: must be in"),
])
def test_invalid_training_config(kwargs, match):
    with pytest.raises(UsageError, match=match):
        TrainingConfig(**kwargs)


def test_defaults_follow_the_paper_where_it_has_one():
    cfg = TrainingConfig(lr=1e-3, optimizer="adam")
    assert cfg.min_lr == pytest.approx(1e-4) and cfg.weight_decay == 0.0 and cfg.lr_decay_style == "cosine"
    assert TrainingConfig(optimizer="adamw").weight_decay == 0.01
    cfg = TrainingConfig(train_iters=1000, lr_warmup_fraction=0.1)
    assert cfg.lr_warmup_iters == 100 and cfg.lr_decay_iters == 1000


def test_config_file_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: 9m\nhidden-size: 64\nnum_attention_heads: 2\nlr: 0.005\nmicro-batch-size: 3\n"
                    "norm-position: mix\npost-ln-layers: 1\nvocab-size: 512\n")
    model, train = parse_configs(["--config", str(path), "--lr", "0.002", "--num-layers", "3"])
    assert model.hidden_size == 64  # file beats preset
    assert model.ffn_hidden_size == 352 and model.num_layers == 3  # preset kept, flag beats preset
    assert train.lr == 0.002 and train.micro_batch_size == 3  # flag beats file, file beats default
    assert model.positions == ("post", "pre", "pre")
    # JSON works too, and an unknown key is an error naming it.
    jpath = tmp_path / "run.json"
    jpath.write_text(json.dumps({"train_iters": 7, "hidden-size": 32, "num-attention-heads": 2}))
    assert parse_configs(["--config", str(jpath)])[1].train_iters == 7
    jpath.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(UsageError, match="unknown key 'learning_rate'"):
        parse_configs(["--config", str(jpath)])
    with pytest.raises(UsageError, match="--config .*missing.yaml: no such file"):
        parse_configs(["--config", str(tmp_path / "missing.yaml")])


def test_config_file_numbers_in_exponent_form(tmp_path):
    """YAML 1.1 reads `5e-4` (no dot) as a string; the flag's type converts it, as on the command line."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 5e-4\nmin-lr: 5e-5\nadam_eps: 1e-8\ntrain-iters: '150000'\n"
                    "hidden-size: 32\nnum-attention-heads: 2\n")
    _, train = parse_configs(["--config", str(path)])
    assert (train.lr, train.min_lr, train.adam_eps, train.train_iters) == (5e-4, 5e-5, 1e-8, 150000)
    path.write_text("train-iters: 1e5\n")
    with pytest.raises(UsageError, match=r"--config .*run.yaml: train-iters: expected int, got '1e5'"):
        parse_configs(["--config", str(path)])


def test_every_field_has_a_flag():
    flags = {a.dest for a in build_parser()._actions}
    for name in TrainingConfig.__dataclass_fields__:
        assert name in flags
    ns = build_parser().parse_args(["--data-path", "0.3", "a", "0.7", "b", "--local_rank=1", "--bf16"])
    assert ns.data_path == ["0.3", "a", "0.7", "b"] and ns.bf16 is True


def test_vocab_from_tokenizer_padded_and_checked():
    assert padded_vocab_size(32100, 128) == 32128 and padded_vocab_size(32000, 128) == 32000
    assert padded_vocab_size(1000, 128, tensor_parallel=4) == 1024
    model, _ = parse_configs(["--tokenizer", "null:1000", "--hidden-size", "32", "--num-attention-heads", "2"])
    assert model.vocab_size == 1024  # NullTokenizer(1000) has 1001 ids -> 1024
    with pytest.raises(UsageError, match=r"--tokenizer null:1000 has 1001 tokens but the model's --vocab-size is 512"):
        parse_configs(["--tokenizer", "null:1000", "--vocab-size", "512"])


def test_bad_model_flags_are_usage_errors():
    with pytest.raises(UsageError, match="--hidden-size: 30 is not divisible by --num-attention-heads=4"):
        parse_configs(["--hidden-size", "30", "--num-attention-heads", "4"])
    with pytest.raises(UsageError, match="preset: unknown preset '5m'"):
        parse_configs(["--preset", "5m"])
