"""The norm zoo (QK-norm, reordered, HybridNorm/HybridNorm*, DyT/Derf) against naive float64 formulas
(model_reference.py) and, where transformers has the class, against Olmo2ForCausalLM / Qwen3ForCausalLM."""
import math

import pytest
import torch

from megatron_mixln.model import ModelConfig, build_model
from model_reference import apply_norm, block_ref, linear_ref

TINY = dict(vocab_size=61, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, seq_length=16,
            norm_impl="torch")
ALL_POSITIONS = "pre,post,peri,lns,deepnorm,deeppost,reordered,hybrid-first,hybrid"


def _randomise_norms(model, seed=1):
    # Gains start at 1, biases/shifts at 0 (linear biases too), alphas at the init: randomise so a
    # swapped/skipped parameter shows.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias") or name == "embed_scale.weight":
                p.copy_((1 + 0.3 * torch.randn(p.shape, generator=gen)).to(p.dtype))


def model_ref(model, tokens):
    """The whole model from the formulas, layer by layer (float64 when the model is)."""
    cfg = model.config
    h = model.embed.weight[tokens]
    if cfg.learnable_embedding_scale:  # DyT's LLaMA code: x_in = self.shared(x_in) * self.shared_scale
        h = h * model.embed_scale.weight
    for block in model.layers:
        h = block_ref(h, block, cfg.num_layers, cfg.norm_epsilon, cfg.rotary_base)
    return linear_ref(apply_norm(model.final_norm, h, cfg.norm_epsilon), model.lm_head)


CASES = {
    "reordered+full-qk, GQA": dict(norm_position="reordered", qk_norm="full", num_query_groups=2),
    "olmo2 alias, LayerNorm full-qk": dict(norm_position="olmo2", qk_norm="full", normalization="LayerNorm"),
    "pre+head-qk per-head gain": dict(norm_position="pre", qk_norm="head", qk_norm_per_head_gain=True,
                                      num_query_groups=2),
    "hybridnorm-star": dict(norm_position="hybridnorm-star"),
    "hybrid textbook Post-Norm FFN": dict(norm_position="hybrid*2,pre,hybrid", hybrid_ffn_residual_after_norm=False),
    "DyT everywhere + head qk, embedding scale": dict(norm_position=ALL_POSITIONS, normalization="DyT", qk_norm="head",
                                                      learnable_embedding_scale=True),
    "DyT with beta": dict(norm_position="pre,reordered,hybrid", normalization="DyT", dyt_bias=True),
    "Derf everywhere, embedding scale": dict(norm_position=ALL_POSITIONS, normalization="Derf", qk_norm="head",
                                             qk_norm_per_head_gain=True, num_query_groups=2,
                                             learnable_embedding_scale=True),
    "mix + full-qk": dict(norm_position="post*2,reordered,pre", qk_norm="full"),
    "qkv bias (Qwen2), GQA": dict(norm_position="pre,post", add_qkv_bias=True, num_query_groups=2),
    "every linear + head bias, LayerNorm": dict(norm_position="pre,peri,hybrid", normalization="LayerNorm",
                                                 add_bias_linear=True, add_output_layer_bias=True),
}


@pytest.fixture
def float64_rope(monkeypatch):
    """The model's RoPE tables are fp32 by design; a float64 check needs float64 tables (same formula)."""
    import megatron_mixln.model.attention as attention

    def rope64(seq_len, head_dim, base, device):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    monkeypatch.setattr(attention, "rope_cos_sin", rope64)


@pytest.mark.parametrize("case", list(CASES))
def test_model_equals_float64_formula(case, float64_rope):
    kw = CASES[case]
    from megatron_mixln.model.positions import parse_position_list

    layers = len(parse_position_list(kw["norm_position"])) if "," in kw["norm_position"] else 4
    cfg = ModelConfig(**TINY, num_layers=layers, **kw)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    _randomise_norms(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 11))
    logits = model(tokens)
    ref = model_ref(model, tokens)
    torch.testing.assert_close(logits, ref, atol=1e-10, rtol=1e-10)
    # every parameter's gradient, through the same formulas
    params = dict(model.named_parameters())
    up = torch.randn(logits.shape, dtype=torch.float64)
    g_model = torch.autograd.grad(logits, list(params.values()), up, allow_unused=True)
    g_ref = torch.autograd.grad(model_ref(model, tokens), list(params.values()), up, allow_unused=True)
    for name, a, b in zip(params, g_model, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")


def test_parameters_and_inits_per_site():
    cfg = ModelConfig(**TINY, num_layers=3, norm_position="hybridnorm-star", normalization="Derf",
                      qk_norm_per_head_gain=True, num_query_groups=2, dyt_alpha_init="0.7,0.3,0.1")
    model = build_model(cfg)
    first, later = model.layers[0], model.layers[1]
    assert first.position == "hybrid-first" and later.position == "hybrid"
    assert hasattr(first, "attn_norm") and not hasattr(later, "attn_norm")  # HybridNorm: no attention input norm
    assert later.attn.q_norm.weight.shape == (4, 8) and later.attn.k_norm.weight.shape == (2, 8)
    assert later.attn.v_norm is not None
    assert first.attn_norm.alpha.item() == pytest.approx(0.7) and later.mlp_norm.alpha.item() == pytest.approx(0.3)
    assert model.final_norm.alpha.item() == pytest.approx(0.1) and later.attn.q_norm.alpha.item() == pytest.approx(0.7)
    assert later.mlp_norm.shift.item() == 0.0 and later.mlp_norm.bias is not None
    full = build_model(ModelConfig(**TINY, num_layers=1, qk_norm="full", num_query_groups=2)).layers[0].attn
    assert full.q_norm.weight.shape == (32,) and full.k_norm.weight.shape == (16,) and full.v_norm is None
    dyt = build_model(ModelConfig(**TINY, num_layers=1, normalization="DyT")).layers[0]
    assert dyt.attn_norm.bias is None and dyt.attn_norm.alpha.item() == pytest.approx(0.8)  # DyT LLaMA: no beta
    assert model.embed_scale is None  # the dataclass default: off
    scaled = build_model(ModelConfig(**TINY, num_layers=1, normalization="DyT", learnable_embedding_scale=True))
    assert scaled.embed_scale.weight.shape == (1,) and scaled.embed_scale.weight.item() == pytest.approx(math.sqrt(32))


def test_embedding_scale_defaults_to_the_code_at_the_command_line():
    """On with DyT/Derf (their LLaMA / GPT-2 code), off otherwise, overridable; a config dict written before the
    field existed (an old DyT checkpoint's) builds the model it was, without the scale."""
    from megatron_mixln.cli import config_from_flags
    from megatron_mixln.training.arguments import parse_configs

    def resolved(**given):
        return config_from_flags(ModelConfig, {**TINY, "num_layers": 1, **given}).learnable_embedding_scale

    assert resolved(normalization="DyT") and resolved(normalization="derf")
    assert not resolved() and not resolved(normalization="LayerNorm")
    assert not resolved(normalization="DyT", learnable_embedding_scale=False) and resolved(learnable_embedding_scale=True)
    assert parse_configs(["--normalization", "DyT", "--vocab-size", "64"])[0].learnable_embedding_scale
    assert not parse_configs(["--normalization", "DyT", "--no-learnable-embedding-scale"])[0].learnable_embedding_scale
    old = {k: v for k, v in ModelConfig(**TINY, num_layers=1, normalization="DyT").to_dict().items()
           if k != "learnable_embedding_scale"}
    model = build_model(ModelConfig(**old))
    assert model.embed_scale is None and "embed_scale.weight" not in model.state_dict()


@pytest.mark.parametrize("kw, flag", [
    (dict(qk_norm="rms"), "--qk-norm: unknown 'rms'; allowed: none, head, full"),
    (dict(normalization="tanh"), "--normalization: unknown 'tanh'; allowed: RMSNorm, LayerNorm, DyT, Derf"),
    (dict(norm_position="olmo3"), "norm_position: unknown value 'olmo3'; allowed: pre, post, peri, lns, deepnorm, deeppost, reordered, hybrid, hybrid-first"),
    (dict(normalization="DyT", qk_norm="full"), "--qk-norm: 'full'"),
    (dict(normalization="Derf", norm_impl="apex"), "--norm-impl: 'apex' has no Derf kernel"),
    (dict(dyt_bias=True), "--dyt-bias: only applies to --normalization DyT"),
    (dict(dyt_alpha_init="0.5,0.5"), "--dyt-alpha-init: expected three numbers"),
    (dict(norm_position="hybrid", qk_norm="full"), "--qk-norm: 'full' conflicts with the hybrid positions"),
])
def test_bad_input_names_the_flag(kw, flag):
    with pytest.raises(ValueError, match="^" + flag.replace("(", r"\(").replace("*", r"\*")[:40].replace(".", r"\.")):
        ModelConfig(**{**TINY, "num_layers": 2, **kw})


def test_z_loss_logsumexp_matches_torch():
    from megatron_mixln.training.loss import make_z_loss_fn

    logits = (torch.randn(2, 5, 61, dtype=torch.float64) * 4).requires_grad_(True)
    z = make_z_loss_fn(1e-4)(logits)
    ref = 1e-4 * torch.logsumexp(logits, dim=-1) ** 2
    torch.testing.assert_close(z, ref.float())
    g, = torch.autograd.grad(z.sum(), logits)
    g_ref, = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=1e-6)
    assert make_z_loss_fn(0.0) is None


# ---- transformers is the referee: stock classes with the same weights give the same fp32 logits ----

def _hf_common(cfg):
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_query_groups, max_position_embeddings=cfg.seq_length,
                rms_norm_eps=cfg.norm_epsilon, rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
                attention_bias=False, tie_word_embeddings=False, hidden_act="silu")


def _copy_weights(model, hf, norm_names):
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.final_norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, b in enumerate(model.layers):
        pre = f"model.layers.{i}."
        for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            sd[pre + f"self_attn.{p}.weight"] = getattr(b.attn, p).weight
        for p in ("gate_proj", "up_proj", "down_proj"):
            sd[pre + f"mlp.{p}.weight"] = getattr(b.mlp, p).weight
        for ours, theirs in norm_names.items():
            sd[pre + f"{theirs}.weight"] = getattr(b, ours).weight
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)


@pytest.mark.parametrize("family", ["olmo2", "qwen3"])
def test_stock_transformers_class_gives_equal_logits(family):
    transformers = pytest.importorskip("transformers")
    if family == "olmo2":
        cfg = ModelConfig(**TINY, num_layers=3, norm_position="reordered", qk_norm="full", num_query_groups=2)
        hf_cls, hf_cfg = transformers.Olmo2ForCausalLM, transformers.Olmo2Config(**_hf_common(cfg))
        norm_names = {"attn_norm": "post_attention_layernorm", "mlp_norm": "post_feedforward_layernorm"}
    else:
        cfg = ModelConfig(**TINY, num_layers=3, norm_position="pre", qk_norm="head", num_query_groups=2)
        hf_cls = transformers.Qwen3ForCausalLM
        hf_cfg = transformers.Qwen3Config(**_hf_common(cfg), head_dim=cfg.head_dim, use_sliding_window=False)
        norm_names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    torch.manual_seed(0)
    model = build_model(cfg)
    _randomise_norms(model)
    hf_cfg._attn_implementation = "eager"
    hf = hf_cls(hf_cfg).eval()
    _copy_weights(model, hf, norm_names)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert math.isfinite(float(ours.abs().max()))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads, groups, flag", [(6, 6, "--num-attention-heads=6"), (8, 2, "--num-query-groups=2")])
def test_full_qk_norm_refuses_heads_tp_does_not_divide(heads, groups, flag):
    from megatron_mixln.parallel.tensor_parallel import check_tensor_parallel_config

    cfg = ModelConfig(**{**TINY, "hidden_size": 8 * heads, "num_attention_heads": heads}, num_layers=1,
                      qk_norm="full", num_query_groups=groups, norm_position="reordered")
    with pytest.raises(ValueError, match=f"^--qk-norm full: {flag} is not divisible by --tensor-model-parallel-size=4"):
        check_tensor_parallel_config(cfg, 4, False)
