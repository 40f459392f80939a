"""Continuing a run from every kind of checkpoint restores exactly the weights it claims, whatever the
precision and ZeRO stage: {HF import, `convert_checkpoint.py --to deepspeed`, universal reshape} x
{fp32, bf16} x {ZeRO 0, 1, 3} (one rank; ZeRO partitions over one rank go through the same load
paths). After resuming, one step at lr 1e-30 -- far below bf16's resolution, and weight decay 0 --
must leave the weights equal to the loaded ones (rounded to bf16 in a bf16 run): DeepSpeed's fp32
master weights were refreshed from what was loaded, not left at the random initialisation. A universal
reshape and a stop save keep the optimizer states, so there a normal continuation equals the
uninterrupted run. (Rollback: tests/training/test_rollback.py; signals: test_preemption.py.)"""

import pytest
import torch

from training_testlib import tiny_datasets, tiny_model, tiny_train

from megatron_mixln.model import ModelConfig
from megatron_mixln.training import trainer

TINY_LR = 1e-30
PRECISIONS = {"fp32": {}, "bf16": {"bf16": True}}


def _module_weights(engine) -> dict:
    """The full fp32 weights of the engine's module (ZeRO-3 partitions gathered)."""
    import deepspeed

    params = list(engine.module.parameters())
    gather = (deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3
              else torch.no_grad())
    with gather:
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def _one_tiny_step(model_config, load, iteration, precision, zero):
    cfg = tiny_train(load=load, train_iters=iteration + 1, lr=TINY_LR, min_lr=0.0, lr_warmup_iters=0,
                     override_opt_param_scheduler=True,  # the tiny LR is the point: not the checkpoint's
                     eval_iters=0, zero_stage=zero, clip_grad=0.0, **PRECISIONS[precision])
    run = trainer.pretrain(model_config, cfg, tiny_datasets())
    try:
        assert [h["step"] for h in run.history] == [iteration + 1]
        return _module_weights(run.engine)
    finally:
        run.engine.destroy()


def _assert_kept(got: dict, want: dict, precision: str, what: str):
    for name, w in want.items():
        expected = w.to(torch.bfloat16).float() if precision == "bf16" else w.float()
        g = got[name]
        assert torch.equal(g, expected), (f"{what}: {name} moved by {(g - expected).abs().max().item():.3g} "
                                          f"(relative {((g - expected).norm() / expected.norm()).item():.3g})")


@pytest.fixture(scope="module")
def trained(single_rank, tmp_path_factory):
    """A 3-step fp32 ZeRO-0 run and a 3-step bf16 ZeRO-0 run, both saved (their weights differ from any init)."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    for precision in PRECISIONS:
        save = str(root / precision)
        run = trainer.pretrain(tiny_model(), tiny_train(train_iters=3, save=save, eval_iters=0,
                                                        **PRECISIONS[precision]), tiny_datasets())
        run.engine.destroy()
        out[precision] = save
    return out


@pytest.fixture(scope="module")
def converted(trained, tmp_path_factory):
    """`convert_checkpoint.py --to deepspeed --tp 1` of each trained run, and the weights it holds."""
    from megatron_mixln.checkpoint.convert import convert
    from megatron_mixln.checkpoint.reader import read_full_state_dict

    root = tmp_path_factory.mktemp("converted")
    out = {}
    for precision, src in trained.items():
        dst = str(root / precision)
        convert(src, dst, to="deepspeed", tp=1, pp=1)
        out[precision] = (dst, read_full_state_dict(dst).state_dict)
    return out


@pytest.fixture(scope="module")
def hf_import(tmp_path_factory):
    """A stock transformers LlamaForCausalLM (random weights) imported with tools/convert_from_hf.py's code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_mixln.hf.hf_import import import_from_hf, read_hf_model

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(3)
    hf_config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                            tie_word_embeddings=False)
    LlamaForCausalLM(hf_config).save_pretrained(str(root / "hf"))
    summary = import_from_hf(str(root / "hf"), str(root / "ckpt"))
    config = ModelConfig(**{**summary["model_config"], "seq_length": 16})
    return str(root / "ckpt"), read_hf_model(str(root / "hf"))[0], config


@pytest.mark.parametrize("zero", [0, 1, 3])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_converted_checkpoint_weights_survive_the_first_step(converted, precision, zero):
    source = "bf16" if precision == "bf16" else "fp32"  # a bf16 run's conversion resumed in bf16, and fp32's
    path, weights = converted[source]
    got = _one_tiny_step(tiny_model(), path, 3, precision, zero)
    _assert_kept(got, weights, precision, f"--to deepspeed of the {source} run, resumed {precision} ZeRO-{zero}")


@pytest.mark.parametrize("zero", [0, 1, 3])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_hf_import_weights_survive_the_first_step(single_rank, hf_import, precision, zero):
    path, weights, config = hf_import
    got = _one_tiny_step(config, path, 0, precision, zero)
    _assert_kept(got, weights, precision, f"HF import, {precision} ZeRO-{zero}")


def test_bf16_universal_reshape_continues_the_uninterrupted_curve(single_rank, tmp_path):
    """bf16 ZeRO-1, saved at step 3, made universal, resumed at ZeRO-2: the same losses as without the stop."""
    from megatron_mixln.checkpoint.universal import convert_to_universal

    run = dict(train_iters=6, eval_iters=0, lr_warmup_iters=1, bf16=True)
    whole = trainer.pretrain(tiny_model(), tiny_train(zero_stage=1, **run), tiny_datasets())
    whole.engine.destroy()
    save = str(tmp_path / "cut")
    cut = trainer.pretrain(tiny_model(), tiny_train(zero_stage=1, save=save, exit_interval=3, **run), tiny_datasets())
    cut.engine.destroy()
    convert_to_universal(save, str(tmp_path / "universal"))
    resumed = trainer.pretrain(tiny_model(), tiny_train(zero_stage=2, load=str(tmp_path / "universal"), **run),
                               tiny_datasets())
    resumed.engine.destroy()
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    for got, want in zip(resumed.history, whole.history[3:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), got["step"]


@pytest.mark.parametrize("precision, zero", [("bf16", 0), ("bf16", 3), ("fp32", 3)])
def test_a_stop_save_continues_the_uninterrupted_curve(single_rank, tmp_path, precision, zero):
    """A save at a stop (here --exit-interval; a signal takes the same path) resumed with --load: the same
    losses as the run that never stopped, masters and moments included."""
    run = dict(train_iters=5, eval_iters=0, lr_warmup_iters=1, zero_stage=zero, **PRECISIONS[precision])
    whole = trainer.pretrain(tiny_model(), tiny_train(**run), tiny_datasets())
    whole.engine.destroy()
    save = str(tmp_path / "cut")
    trainer.pretrain(tiny_model(), tiny_train(save=save, exit_interval=2, **run), tiny_datasets()).engine.destroy()
    resumed = trainer.pretrain(tiny_model(), tiny_train(load=save, **run), tiny_datasets())
    resumed.engine.destroy()
    assert [h["step"] for h in resumed.history] == [3, 4, 5]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history[2:]], rel=1e-6)
