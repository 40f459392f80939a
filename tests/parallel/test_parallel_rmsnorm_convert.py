"""convert_checkpoint.py --to rmsnorm: a LayerNorm Pre-LN checkpoint as the RMSNorm one with the same
outputs (arXiv 2305.14858). The reference is the original LayerNorm model itself."""
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


def layernorm_model(beta: float = 0.0, **overrides):
    """A LayerNorm Pre-LN model (a pre and an lns layer) with random gains, embeddings that are NOT
    zero-mean, and every norm's β = `beta`."""
    cfg = tiny_config(**{"normalization": "LayerNorm", "norm_position": "pre,lns", "num_layers": 2, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.embed.weight.add_(0.3)  # a large common mean per row: centring matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("norm.bias"):
                p.fill_(beta)
    return cfg, model


def _tokens(cfg):
    return torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(1))


def test_converted_rmsnorm_model_matches_layernorm_logits(tmp_path):
    cfg, model = layernorm_model()
    save_plain(model.state_dict(), str(tmp_path / "ln"), cfg)
    assert _cli().main(["--input", str(tmp_path / "ln"), "--output", str(tmp_path / "rms"), "--to", "rmsnorm"]) == 0
    plain, new_cfg, _ = load_plain(str(tmp_path / "rms"))
    assert new_cfg.normalization == "RMSNorm" and new_cfg.positions == cfg.positions
    converted = build_model(new_cfg)
    converted.load_state_dict(plain, strict=True)  # no LayerNorm bias left over, nothing missing
    tokens = _tokens(cfg)
    with torch.no_grad():
        ref, out = model(tokens), converted(tokens)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # The check is not vacuous: the same weights without recentring give other logits.
    raw = build_model(new_cfg)
    raw.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("norm.bias")})
    with torch.no_grad():
        assert (raw(tokens) - ref).abs().max() > 1e-2


def test_recentred_residual_stream_is_zero_mean_float64():
    cfg, model = layernorm_model(cross_block_fusion=False)
    plain64 = {k: v.double() for k, v in model.state_dict().items()}
    plain, new_cfg, _ = to_rmsnorm(plain64, cfg, {}, "test")
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
    cfg, model = layernorm_model()
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
    (0.1, {}, ("LayerNorm biases are non-zero", "StableLmForCausalLM")),
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
