"""Metrics: the JSON-lines file, wandb (faked: no service, no network), the console line and MFU."""
import json
import os
import sys
import types

import pytest

from megatron_mixln.training.flops import default_peak_tflops, flops_per_token, memory_gib
from megatron_mixln.training.metrics import MetricsLogger, format_train_line


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, values, step):
        self.logs.append((step, values))

    def finish(self):
        self.finished += 1


def test_metrics_file_and_config(tmp_path):
    run = tmp_path / "run"
    logger = MetricsLogger(str(run), True, {"model": {"hidden_size": 32}})
    logger.log("train", 1, {"loss": 2.5, "lr": 1e-3})
    logger.log("grad_norms", 1, {"grad_norm/layer_01/attn": 0.1})
    logger.close()
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("grad_norms", 1)]
    assert records[0]["loss"] == 2.5 and records[1]["grad_norm/layer_01/attn"] == 0.1
    assert json.load(open(run / "config.json")) == {"model": {"hidden_size": 32}}
    other_rank = MetricsLogger(str(tmp_path / "rank1"), False, {})
    other_rank.log("train", 1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "rank1")


def test_wandb_offline_by_default_and_no_environment(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    logger = MetricsLogger(str(tmp_path), True, {"training": {"lr": 1e-3}}, wandb_project="mixln", wandb_name="mix")
    logger.log("train", 5, {"loss": 2.0, "note": "text"})
    logger.log("grad_norms", 5, {"grad_norm/layer_01/mlp": 0.3})
    logger.close()
    (init,) = fake.inits
    assert init["mode"] == "offline" and init["project"] == "mixln" and init["name"] == "mix"
    assert "secret-key-123" not in json.dumps(init, default=str)
    assert fake.logs == [(5, {"train/loss": 2.0}), (5, {"grad_norm/layer_01/mlp": 0.3})] and fake.finished == 1


def test_wandb_missing_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.warns(UserWarning, match="wandb is not importable") as caught:
        logger = MetricsLogger(str(tmp_path), True, {}, wandb_project="mixln")
        for step in range(3):
            logger.log("train", step, {"loss": 1.0})
    assert len(caught) == 1
    logger.close()


def test_console_line():
    line = format_train_line(10, 100, {"loss": 3.14159, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 12345.6,
                                       "mfu": 0.42, "memory_gib": 1.5, "skipped_steps": 2})
    assert line == ("step     10/100 | loss 3.1416 | lr 1.000e-03 | grad norm 0.500 | tok/s 12,346 | mfu 42.0% | "
                    "mem 1.50 GiB | skipped 2")


def test_flops_and_device_numbers():
    # 6 x (all params but the input embedding) + 12 L d T attention FLOPs per token.
    assert flops_per_token(1_000_000, 200_000, 4, 64, 128) == 6 * 800_000 + 12 * 4 * 64 * 128
    assert memory_gib() > 0


def test_peak_is_known_only_for_listed_gpus(monkeypatch):
    """MFU needs a published peak: a listed GPU (by name, per dtype) or --peak-tflops; never a CPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_peak_tflops(bf16=True) is None and default_peak_tflops(bf16=False) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert default_peak_tflops(bf16=True) == 989.0 and default_peak_tflops(bf16=False) == 494.7
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce GTX 1080")
    assert default_peak_tflops(bf16=True) is None


def test_mfu_reported_only_with_a_known_peak(single_rank, tmp_path, capsys):
    """On CPU: no mfu in the console line or the metrics file; with --peak-tflops: MFU =
    flops/token x tokens/s / peak, checked from the logged tokens/s and the model's parameter count."""
    from training_testlib import run_and_destroy, tiny_datasets, tiny_model, tiny_train

    if torch_cuda_available():
        pytest.skip("checks the CPU behaviour")
    cfg = tiny_model()
    for name, peak in (("cpu", None), ("given", 0.5)):
        run = tmp_path / name
        run_and_destroy(cfg, tiny_train(run_dir=str(run), train_iters=2, peak_tflops=peak), tiny_datasets())
        out = capsys.readouterr().out
        rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
        train = [r for r in rows if r["kind"] == "train"]
        params = json.load(open(run / "config.json"))["parameters"]
        if peak is None:
            assert "mfu" not in out and all(r["mfu"] is None for r in train), out
        else:
            fpt = flops_per_token(params, cfg.vocab_size * cfg.hidden_size, cfg.num_layers, cfg.hidden_size,
                                  cfg.seq_length)
            for r in train:
                assert r["mfu"] == pytest.approx(fpt * r["tokens_per_sec"] / (peak * 1e12), rel=1e-9)
            assert "mfu " in out


def torch_cuda_available():
    import torch

    return torch.cuda.is_available()
