"""The DeepSpeed JSON is filled from the flags; a contradiction is an error naming both values."""
import glob
import json
import os

import pytest

from megatron_mixln.errors import UsageError
from megatron_mixln.training.config import TrainingConfig
from megatron_mixln.training.ds_config import build_ds_config, optimizer_offloaded, zero_auto_sizes, zero_stage_of

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _write(tmp_path, data):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json"))))
def test_shipped_configs_fill_from_flags(path):
    cfg = TrainingConfig(deepspeed_config=path, micro_batch_size=4, lr=5e-4, bf16=True, optimizer="adam",
                         clip_grad=1.0)
    ds = build_ds_config(cfg, global_batch_size=32, gradient_accumulation_steps=4, hidden_size=4096)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["type"] == "Adam" and ds["optimizer"]["params"]["adam_w_mode"] is False
    assert ds["optimizer"]["params"]["lr"] == 5e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.0
    stage = int(os.path.basename(path)[4])
    assert zero_stage_of(ds) == stage
    # Offloaded optimizer states use DeepSpeed's CPU Adam by default, torch Adam otherwise.
    assert ds["optimizer"]["params"]["torch_adam"] is (not optimizer_offloaded(ds))
    assert optimizer_offloaded(ds) == ("offload" in path)


@pytest.mark.parametrize("field, value, flags, match", [
    ("train_batch_size", 64, {}, r'"train_batch_size" is 64 but --global-batch-size gives 32'),
    ("train_micro_batch_size_per_gpu", 2, {}, r'"train_micro_batch_size_per_gpu" is 2 but --micro-batch-size gives 4'),
    ("gradient_accumulation_steps", 1, {}, r'"gradient_accumulation_steps" is 1 but --global-batch-size'),
    ("gradient_clipping", 0.5, {}, r'"gradient_clipping" is 0.5 but --clip-grad gives 1.0'),
    ("bf16", {"enabled": True}, {}, r'"bf16.enabled" is True but --bf16 gives False'),
    ("zero_optimization", {"stage": 2}, {"zero_stage": 3}, r'"zero_optimization.stage" is 2 but --zero-stage gives 3'),
    ("optimizer", {"type": "AdamW", "params": {"lr": 0.1}}, {}, r'"optimizer.params.lr" is 0.1 but --lr gives 0.001'),
    ("optimizer", {"type": "Adam"}, {"optimizer": "adam"}, r'"optimizer.type" .Adam. \(adam_w_mode=True\) means adamw'),
    ("optimizer", {"type": "Lamb"}, {}, r'"optimizer.type" .Lamb. is not supported'),
    ("scheduler", {"type": "WarmupLR"}, {}, r'has a "scheduler" section'),
    ("fp16", {"enabled": True}, {}, "fp16 is not supported"),
])
def test_contradictions_are_errors(tmp_path, field, value, flags, match):
    path = _write(tmp_path, {field: value})
    cfg = TrainingConfig(deepspeed_config=path, micro_batch_size=4, lr=1e-3, **flags)
    with pytest.raises(UsageError, match=match):
        build_ds_config(cfg, global_batch_size=32, gradient_accumulation_steps=8)


def test_auto_and_equal_values_are_accepted(tmp_path):
    path = _write(tmp_path, {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4,
                             "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.999]}}})
    ds = build_ds_config(TrainingConfig(deepspeed_config=path, micro_batch_size=4), 8, 2)
    assert ds["train_batch_size"] == 8 and ds["optimizer"]["params"]["lr"] == 1e-3


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(UsageError, match="--deepspeed-config .*nope.json: no such file"):
        build_ds_config(TrainingConfig(deepspeed_config=str(tmp_path / "nope.json")), 4, 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        build_ds_config(TrainingConfig(deepspeed_config=str(bad)), 4, 1)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "ds_configs", "zero3*.json"))))
@pytest.mark.parametrize("hidden", [64, 4096])
def test_zero3_auto_sizes_are_transformers_formulas(path, hidden):
    """ZeRO-3 bucket sizes are "auto" in the shipped configs and filled from the hidden size exactly as
    transformers' DeepSpeed integration fills them (HfTrainerDeepSpeedConfig.trainer_config_finalize)."""
    from types import SimpleNamespace

    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    with open(path) as fh:
        shipped = json.load(fh)["zero_optimization"]
    assert all(shipped[k] == "auto" for k in zero_auto_sizes(1))
    hf = HfTrainerDeepSpeedConfig({"zero_optimization": dict(shipped)})
    hf.trainer_config_finalize(SimpleNamespace(get_warmup_steps=lambda n: 1),
                               SimpleNamespace(config=SimpleNamespace(hidden_size=hidden)), 10)
    ours = build_ds_config(TrainingConfig(deepspeed_config=path, micro_batch_size=4, bf16=True), 8, 2, hidden)
    for key in zero_auto_sizes(1):
        assert ours["zero_optimization"][key] == hf.config["zero_optimization"][key]
    assert ours["zero_optimization"]["reduce_bucket_size"] == hidden * hidden


def test_auto_sizes_need_a_hidden_size(tmp_path):
    path = _write(tmp_path, {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}})
    with pytest.raises(UsageError, match=r'"zero_optimization.reduce_bucket_size" is "auto" but no hidden size'):
        build_ds_config(TrainingConfig(deepspeed_config=path, micro_batch_size=4), 8, 2)
    path = _write(tmp_path, {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "auto"}})
    with pytest.raises(UsageError, match=r'"zero_optimization.stage3_max_live_parameters" cannot be "auto"'):
        build_ds_config(TrainingConfig(deepspeed_config=path, micro_batch_size=4), 8, 2, 64)
@pytest.mark.parametrize("name, fused", [("zero1.json", True), ("zero3_offload.json", None)])
def test_torch_adam_is_fused_on_cuda_unless_offloaded(monkeypatch, name, fused):
    import megatron_mixln.training.ds_config as ds_config

    monkeypatch.setattr(ds_config, "_cuda_available", lambda: True)
    cfg = TrainingConfig(deepspeed_config=os.path.join(REPO, "ds_configs", name), micro_batch_size=4, bf16=True)
    ds = build_ds_config(cfg, global_batch_size=32, gradient_accumulation_steps=4, hidden_size=64)
    assert ds["optimizer"]["params"].get("fused") is fused
    monkeypatch.setattr(ds_config, "_cuda_available", lambda: False)
    ds = build_ds_config(cfg, global_batch_size=32, gradient_accumulation_steps=4, hidden_size=64)
    assert "fused" not in ds["optimizer"]["params"]
