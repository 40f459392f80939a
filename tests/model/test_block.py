"""Each norm position against the naive reference in model_reference.py: forward and all gradients."""
import pytest
import torch

from megatron_mixln.model import ModelConfig, build_model
from megatron_mixln.model.block import resolve_stream
from megatron_mixln.model.positions import POSITIONS, TWO_STREAM
from model_reference import block_ref, norm_ref


def _perturb_norms(model, gen):
    # Norm weights start at 1 and biases at 0: randomise them so a swapped or skipped norm shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))


def _check_layerwise(cfg, atol=2e-5):
    torch.manual_seed(0)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(1)
    _perturb_norms(model, gen)
    x = torch.randn(2, 7, cfg.hidden_size, generator=gen)
    for block in model.layers:
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        out = resolve_stream(block(xa))  # h + d when the block hands its last add to the next
        params = dict(block.named_parameters())
        ref = block_ref(xb, block, cfg.num_layers, cfg.norm_epsilon, cfg.rotary_base)
        torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5)
        upstream = torch.randn(out.shape, generator=gen)
        g_model = torch.autograd.grad(out, [xa, *params.values()], upstream)
        g_ref = torch.autograd.grad(ref, [xb, *params.values()], upstream)
        for name, a, b in zip(["x", *params], g_model, g_ref):
            torch.testing.assert_close(a, b, atol=atol * 10, rtol=1e-4, msg=f"{block.position}: grad of {name}")
        x = out.detach()


@pytest.mark.parametrize("position", [p for p in POSITIONS if p not in TWO_STREAM])  # tests/model/test_two_stream.py
@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_each_position_matches_formula(position, normalization):
    cfg = ModelConfig(
        vocab_size=50, hidden_size=32, ffn_hidden_size=48, num_layers=3, num_attention_heads=4,
        norm_position=position, normalization=normalization, norm_impl="torch",
    )
    _check_layerwise(cfg)


def test_mix_schedule_with_gqa_matches_formula():
    cfg = ModelConfig(
        vocab_size=50, hidden_size=32, ffn_hidden_size=48, num_layers=4, num_attention_heads=4,
        num_query_groups=2, norm_position="mix", post_ln_layers=2, norm_impl="torch",
    )
    assert [b.position for b in build_model(cfg).layers] == ["post", "post", "pre", "pre"]
    _check_layerwise(cfg)


def test_norms_compute_in_fp32_for_bf16_params():
    cfg = ModelConfig(vocab_size=50, hidden_size=64, ffn_hidden_size=64, num_layers=1, num_attention_heads=4,
                      norm_impl="torch")
    norm = build_model(cfg).layers[0].attn_norm
    x = (torch.randn(3, 64) * 50).to(torch.bfloat16)
    out = norm.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    ref = norm_ref(x.double(), norm.weight.double())
    # fp32 statistics: error is bf16 output rounding only (~2^-8 relative)
    assert ((out.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max() < 1e-2


def test_final_norm_is_applied_for_every_position_and_can_be_disabled():
    base = dict(vocab_size=50, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    m = build_model(ModelConfig(**base, norm_position="post"))
    assert isinstance(m.final_norm, torch.nn.Module) and hasattr(m.final_norm, "weight")
    tokens = torch.randint(0, 50, (2, 5))
    h = m.embed(tokens)
    for layer in m.layers:
        h = resolve_stream(layer(h))
    torch.testing.assert_close(m(tokens), norm_ref(h, m.final_norm.weight) @ m.lm_head.weight.T, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    m2 = build_model(ModelConfig(**base, norm_position="post", final_norm=False))
    assert not any("final_norm" in n for n, _ in m2.named_parameters())
    h = m2.embed(tokens)
    for layer in m2.layers:
        h = layer(h)
    torch.testing.assert_close(m2(tokens), h @ m2.lm_head.weight.T)


def test_residual_stream_keeps_fp32_under_autocast():
    """fp32 parameters under bf16 autocast: sublayer outputs are bf16, but adding them to the fp32
    stream must give fp32 (as eager `x + attn_out` would), for every position family."""
    cfg = ModelConfig(vocab_size=50, hidden_size=32, ffn_hidden_size=48, num_layers=4, num_attention_heads=4,
                      norm_position="pre,post,peri,deepnorm", norm_impl="torch")
    model = build_model(cfg)
    tokens = torch.randint(0, 50, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.embed(tokens)
        for layer in model.layers:
            h = resolve_stream(layer(h))
            assert h.dtype == torch.float32, layer.position
