"""convert_checkpoint.py --to rmsnorm: a LayerNorm Pre-LN checkpoint as the RMSNorm one with the same
outputs (arXiv 2305.14858), for any LayerNorm β (folded into linear biases). The reference is the
original LayerNorm model itself."""
import importlib.util
import json
import os

import pytest
import torch

from megatron_mixln.checkpoint.convert import load_plain, save_plain, write_deepspeed_checkpoint
from megatron_mixln.checkpoint.rmsnorm import to_rmsnorm
from megatron_mixln.model import ModelConfig, build_model
from parallel_jobs import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(ROOT, "tools", "convert_checkpoint.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def layernorm_model(beta: float = 0.0, linear_bias: float = 0.0, **overrides):
    """A LayerNorm Pre-LN model (a pre and an lns layer) with random gains, embeddings that are NOT
    zero-mean, every norm's β random with std `beta` (0: all zero) and, when the config has linear
    biases, those random with std `linear_bias`."""
    cfg = tiny_config(**{"normalization": "LayerNorm", "norm_position": "pre,lns", "num_layers": 2, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.embed.weight.add_(0.3)  # a large common mean per row: centring matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("norm.bias"):
                p.copy_(beta * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 + linear_bias * torch.randn_like(p))  # o/down biases not zero-mean either
    return cfg, model


def _tokens(cfg):
    return torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("beta, options", [
    (0.0, {}),  # every β zero: the converted model stays bias-free
    (0.3, {"add_qkv_bias": True, "add_bias_linear": True, "add_output_layer_bias": True}),
])
def test_converted_rmsnorm_model_matches_layernorm_logits(tmp_path, beta, options):
    cfg, model = layernorm_model(beta)
    save_plain(model.state_dict(), str(tmp_path / "ln"), cfg)
    assert _cli().main(["--input", str(tmp_path / "ln"), "--output", str(tmp_path / "rms"), "--to", "rmsnorm"]) == 0
    plain, new_cfg, _ = load_plain(str(tmp_path / "rms"))
    assert new_cfg.normalization == "RMSNorm" and new_cfg.positions == cfg.positions
    assert {k: getattr(new_cfg, k) for k in ("add_qkv_bias", "add_bias_linear", "add_output_layer_bias")} == \
        {"add_qkv_bias": False, "add_bias_linear": False, "add_output_layer_bias": False, **options}
    converted = build_model(new_cfg)
    converted.load_state_dict(plain, strict=True)  # no LayerNorm bias left over, nothing missing
    tokens = _tokens(cfg)
    with torch.no_grad():
        ref, out = model(tokens), converted(tokens)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # The check is not vacuous: the same weights without recentring (and folding) give other logits.
    raw = build_model(new_cfg)
    raw.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("norm.bias")}, strict=False)
    with torch.no_grad():
        assert (raw(tokens) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("overrides", [{}, {"add_bias_linear": True, "num_query_groups": 2}])
def test_folded_recentred_model_is_exact_in_float64(overrides):
    """Non-zero β and γ (and, second case, a model that already has q/k/v/o/gate/up/down biases, o/down ones not
    zero-mean): every residual-stream vector of the converted model is zero-mean and its logits equal the
    LayerNorm model's to float64 rounding."""
    cfg, model = layernorm_model(0.3, linear_bias=0.2, cross_block_fusion=False, **overrides)
    plain64 = {k: v.double() for k, v in model.state_dict().items()}
    plain, new_cfg, _ = to_rmsnorm(plain64, cfg, {}, "test")
    assert new_cfg.add_bias_linear and new_cfg.add_output_layer_bias
    converted = build_model(new_cfg).double()
    converted.load_state_dict(plain)
    model.double()
    streams = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: streams.append(out)) for m in (converted.embed, *converted.layers)]
    tokens = _tokens(cfg)
    with torch.no_grad():
        out, ref = converted(tokens), model(tokens)
    for h in hooks:
        h.remove()
    assert len(streams) == 1 + cfg.num_layers
    for s in streams:  # (batch, seq, hidden) float64: the mean over hidden vanishes to rounding
        assert s.dtype == torch.float64 and s.abs().mean() > 1e-3
        assert s.mean(-1).abs().max() < 1e-14 * s.abs().max() * cfg.hidden_size
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_deepspeed_input_updates_the_recorded_config(tmp_path):
    """A TP=2 DeepSpeed checkpoint with non-zero β: merged, folded, and every recorded config updated."""
    cfg, model = layernorm_model(0.3)
    meta = {"mixln": {"model_config": cfg.to_dict()}, "sidecar_files": {"mixln_meta.json": json.dumps({"model_config": cfg.to_dict()})}}
    write_deepspeed_checkpoint(model.state_dict(), str(tmp_path / "ds"), "step1", tp=2, pp=1, engine="plain",
                               metadata=meta, config=cfg)
    assert _cli().main(["--input", str(tmp_path / "ds"), "--output", str(tmp_path / "rms"), "--to", "rmsnorm"]) == 0
    plain, new_cfg, metadata = load_plain(str(tmp_path / "rms"))
    assert metadata["mixln"]["model_config"]["normalization"] == "RMSNorm"
    assert json.loads(metadata["sidecar_files"]["mixln_meta.json"])["model_config"]["normalization"] == "RMSNorm"
    converted = build_model(ModelConfig(**metadata["mixln"]["model_config"]))
    converted.load_state_dict(plain)
    tokens = _tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens), model(tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("beta, overrides, words", [
    (0.1, {"tie_embeddings": True}, ("--tie-embeddings",)),
    (0.0, {"norm_position": "post,pre"}, ("--norm-position has post",)),
    (0.0, {"qk_norm": "head"}, ("--qk-norm head",)),
])
def test_refusals_are_one_line_exit_2(tmp_path, capsys, beta, overrides, words):
    cfg, model = layernorm_model(beta, **overrides)
    save_plain(model.state_dict(), str(tmp_path / "ln"), cfg)
    assert _cli().main(["--input", str(tmp_path / "ln"), "--output", str(tmp_path / "rms"), "--to", "rmsnorm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert_checkpoint: error: --input ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not os.path.exists(tmp_path / "rms")  # refused before anything is written


def test_converted_model_under_tensor_parallelism_matches_layernorm_logits():
    """The folded biases split over TP=2 (q/k/v, gate/up and the head with their rows) give the LayerNorm
    model's logits, with and without sequence parallelism."""
    from spawn_testlib import run_spawned
    from zoo_jobs import rmsnorm_convert_tp_job

    for res in run_spawned(rmsnorm_convert_tp_job, 2):
        assert res["options"] == [True, True, True]
        assert res["tp"] < 1e-5 and res["sp"] < 1e-5, res
