"""Linear biases (--add-qkv-bias, --add-bias-linear, --add-output-layer-bias): which linears get one, their
zero init, and configs recorded before the options existed. The forward with biases is checked against
the float64 formulas in test_norm_zoo.py (its bias cases)."""
import pytest
import torch

from megatron_mixln.model import ModelConfig, build_model
from megatron_mixln.model.init import init_weights

TINY = dict(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
            num_query_groups=2, seq_length=8)


def _bias_keys(cfg):
    return sorted(k for k in build_model(cfg, "meta").state_dict() if k.endswith(".bias"))


@pytest.mark.parametrize("flags, per_layer, head", [
    ({}, [], False),
    ({"add_qkv_bias": True}, ["attn.k_proj", "attn.q_proj", "attn.v_proj"], False),
    ({"add_bias_linear": True}, ["attn.k_proj", "attn.o_proj", "attn.q_proj", "attn.v_proj", "mlp.down_proj",
                                 "mlp.gate_proj", "mlp.up_proj"], False),
    ({"add_output_layer_bias": True}, [], True),
])
def test_which_linears_have_a_bias(flags, per_layer, head):
    cfg = ModelConfig(**TINY, **flags)
    want = sorted([f"layers.{i}.{m}.bias" for i in range(2) for m in per_layer] + (["lm_head.bias"] if head else []))
    assert _bias_keys(cfg) == want


def test_config_recorded_before_the_options_loads_bias_free():
    old = ModelConfig(**TINY).to_dict()
    for name in ("add_qkv_bias", "add_bias_linear", "add_output_layer_bias"):
        old.pop(name)
    assert _bias_keys(ModelConfig(**old)) == []


def test_biases_start_at_zero_and_draw_no_random_numbers():
    """init_weights zeroes every linear bias without consuming the RNG: from one seed, the weights of a model
    with biases are those of the bias-free model (meta-built, as the trainer and pipeline stages build)."""
    def init(cfg):
        model = build_model(cfg, "meta").to_empty(device="cpu")
        torch.manual_seed(0)
        init_weights(model)
        return model.state_dict()

    plain = init(ModelConfig(**TINY))
    biased = init(ModelConfig(**TINY, add_bias_linear=True, add_output_layer_bias=True))
    assert set(biased) - set(plain) == {k for k in biased if k.endswith("proj.bias") or k == "lm_head.bias"}
    assert all(torch.equal(biased[k], v) for k, v in plain.items())
    assert all(not biased[k].any() for k in set(biased) - set(plain))
