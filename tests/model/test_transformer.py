"""Whole-model checks: parameter counts, presets, init rules, and Pre-LN against transformers' LLaMA."""
import math

import pytest
import torch

from megatron_mixln.model import PRESETS, ModelConfig, build_model, count_parameters, init_weights
from megatron_mixln.model.init import SCALED_EMBEDDING_STD


def _naive_count(h, f, layers, vocab, norms_per_layer=2):
    return 2 * vocab * h + layers * (4 * h * h + 3 * h * f + norms_per_layer * h) + h


@pytest.mark.parametrize("name,expected", [("71m", 70_578_688), ("7b", 6_738_415_616)])
def test_published_parameter_counts(name, expected):
    assert count_parameters(build_model(ModelConfig.from_preset(name), device="meta")) == expected


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_with_the_naive_count(name):
    cfg = ModelConfig.from_preset(name)
    model = build_model(cfg, device="meta")
    assert count_parameters(model) == _naive_count(cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, 32000)
    peri = build_model(ModelConfig.from_preset(name, norm_position="peri"), device="meta")
    assert count_parameters(peri) == _naive_count(cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, 32000, 4)


@pytest.mark.parametrize("name", ["9m", "20m", "35m", "60m", "71m", "100m", "130m", "250m", "350m"])
def test_forward_backward_of_cpu_sized_presets(name):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(name, norm_position="mix")
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 16))
    logits = model(tokens)
    assert logits.shape == (1, 16, cfg.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    # An untrained model with std-0.02 weights predicts close to uniform.
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_meta_model_materialises_and_initialises():
    cfg = ModelConfig.from_preset("9m", vocab_size=100)
    model = build_model(cfg, device="meta")
    model.to_empty(device="cpu")
    init_weights(model)
    assert torch.isfinite(model(torch.randint(0, 100, (1, 4)))).all()
    assert torch.all(model.layers[0].attn_norm.weight == 1)


def _std(t):
    return t.double().std().item()


def test_init_options():
    base = dict(vocab_size=4000, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_layers=8)
    torch.manual_seed(0)
    m = build_model(ModelConfig(**base))
    assert _std(m.embed.weight) == pytest.approx(0.02, rel=0.03)
    assert _std(m.layers[0].attn.o_proj.weight) == pytest.approx(0.02, rel=0.03)
    m = build_model(ModelConfig(**base, scaled_embedding_init=True, scaled_output_init=True))
    assert _std(m.embed.weight) == pytest.approx(SCALED_EMBEDDING_STD, rel=0.03)
    assert SCALED_EMBEDDING_STD == pytest.approx(0.632, abs=1e-3)
    for lin in (m.layers[3].attn.o_proj, m.layers[3].mlp.down_proj):
        assert _std(lin.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert _std(m.layers[3].attn.q_proj.weight) == pytest.approx(0.02, rel=0.03)


@pytest.mark.parametrize("num_layers", [4, 12])
@pytest.mark.parametrize("position", ["deepnorm", "deeppost"])
def test_deepnorm_residual_scale_and_init_gains(position, num_layers):
    cfg = ModelConfig(vocab_size=100, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                      num_layers=num_layers, norm_position=position)
    torch.manual_seed(0)
    m = build_model(cfg)
    L = num_layers
    alpha = (2 * L) ** 0.25 if position == "deepnorm" else math.sqrt(8)
    gain = (8 * L) ** -0.25 if position == "deepnorm" else (8 * L) ** 0.25
    block = m.layers[1]
    assert block.residual_scale == pytest.approx(alpha)
    xavier = lambda lin, g: g * math.sqrt(2.0 / sum(lin.weight.shape))  # noqa: E731
    for lin in (block.attn.v_proj, block.attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
        assert _std(lin.weight) == pytest.approx(xavier(lin, gain), rel=0.04)
    for lin in (block.attn.q_proj, block.attn.k_proj):
        assert _std(lin.weight) == pytest.approx(xavier(lin, 1.0), rel=0.04)


def test_lns_uses_global_one_based_layer_index():
    cfg = ModelConfig(vocab_size=10, hidden_size=32, ffn_hidden_size=32, num_attention_heads=4, num_layers=6,
                      norm_position="pre*2,lns*4")
    m = build_model(cfg, device="meta")
    assert [b.out_scale for b in m.layers] == [1.0, 1.0] + [1 / math.sqrt(l) for l in (3, 4, 5, 6)]


def test_tied_embeddings_share_one_tensor():
    cfg = ModelConfig(vocab_size=100, hidden_size=32, ffn_hidden_size=32, num_attention_heads=4, num_layers=1,
                      tie_embeddings=True)
    m = build_model(cfg)
    assert m.lm_head.weight is m.embed.weight
    assert count_parameters(m) == 100 * 32 + (4 * 32 * 32 + 3 * 32 * 32 + 64) + 32


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_pre_ln_matches_transformers_llama(kv_heads):
    """An independent implementation: HF LlamaForCausalLM with the same weights (Pre-LN, RMSNorm)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ModelConfig(vocab_size=97, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                      num_query_groups=kv_heads, num_layers=3, norm_position="pre", norm_impl="torch")
    torch.manual_seed(0)
    ours = build_model(cfg)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=kv_heads,
        num_hidden_layers=3, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )).eval()
    hf.config._attn_implementation = "eager"
    sd = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.final_norm.weight,
          "lm_head.weight": ours.lm_head.weight}
    for i, b in enumerate(ours.layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": b.attn_norm.weight, p + "post_attention_layernorm.weight": b.mlp_norm.weight})
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = getattr(b.attn, n).weight
        for n in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{n}.weight"] = getattr(b.mlp, n).weight
    with torch.no_grad():
        for b in ours.layers:  # non-trivial norm gains
            b.attn_norm.weight.uniform_(0.5, 1.5)
            b.mlp_norm.weight.uniform_(0.5, 1.5)
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-4)
