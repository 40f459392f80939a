"""Schedules resolve into per-layer lists; bad configs fail when built, naming the field."""
import math

import pytest

from megatron_mixln.model import ModelConfig
from megatron_mixln.model.positions import format_positions, parse_position_list, resolve_positions

SMALL = dict(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4)


@pytest.mark.parametrize("num_layers,k", [(12, 3), (24, 6), (32, 2), (5, 0), (5, 5)])
def test_mix_puts_exactly_first_k_layers_in_post(num_layers, k):
    cfg = ModelConfig(**SMALL, num_layers=num_layers, norm_position="mix", post_ln_layers=k)
    assert cfg.positions == ("post",) * k + ("pre",) * (num_layers - k)


@pytest.mark.parametrize("num_layers,alpha", [(12, 0.25), (24, 0.25), (24, 1 / 6), (24, 1 / 3), (24, 0.5), (7, 0.3)])
def test_mix_fraction_is_floor_alpha_L(num_layers, alpha):
    cfg = ModelConfig(**SMALL, num_layers=num_layers, norm_position="mix", post_ln_fraction=alpha)
    k = math.floor(alpha * num_layers + 1e-9)
    assert cfg.positions.count("post") == k and cfg.positions[:k] == ("post",) * k


def test_default_fraction_is_a_quarter():
    assert ModelConfig(**SMALL, num_layers=24, norm_position="mix").positions.count("post") == 6


@pytest.mark.parametrize(
    "spec",
    ["post,post,pre,pre,pre,pre", "post*2,pre*4", "pre,post,pre,post,peri,lns", "deepnorm*3,deeppost*3", "pre*6"],
)
def test_explicit_lists_round_trip(spec):
    positions = resolve_positions(spec, 6)
    assert len(positions) == 6
    assert resolve_positions(format_positions(positions), 6) == positions
    assert parse_position_list(format_positions(positions)) == list(positions)


def test_reference_code_aliases():
    assert resolve_positions("post_pre", 4, post_ln_layers=1) == ("post", "pre", "pre", "pre")
    assert resolve_positions("sandwich", 2) == ("peri", "peri")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(norm_position="middle"), "norm_position"),
        (dict(norm_position="post*2,banana*2"), "norm_position"),
        (dict(norm_position="mix", post_ln_layers=5), "post_ln_layers"),
        (dict(norm_position="mix", post_ln_fraction=1.5), "post_ln_fraction"),
        (dict(norm_position="post*3"), "norm_position"),  # 3 entries, 4 layers
        (dict(norm_position="pre", post_ln_layers=1), "post_ln_layers"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(num_query_groups=3), "num_attention_heads"),
        (dict(num_layers=0), "num_layers"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(ffn_hidden_size=0), "ffn_hidden_size"),
        (dict(normalization="BatchNorm"), "normalization"),
        (dict(norm_impl="cuda"), "norm_impl"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    args = {**SMALL, "num_layers": 4, **kwargs}
    with pytest.raises(ValueError, match=field):
        ModelConfig(**args)


def test_unknown_position_lists_allowed_values():
    with pytest.raises(ValueError) as e:
        ModelConfig(**SMALL, num_layers=2, norm_position="middle")
    for name in ("pre", "post", "peri", "lns", "deepnorm", "deeppost", "mix"):
        assert name in str(e.value)


def test_presets_are_overridable():
    cfg = ModelConfig.from_preset("130m", vocab_size=1000, seq_length=64, num_layers=2)
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads) == (768, 2048, 12)
    assert (cfg.vocab_size, cfg.seq_length, cfg.num_layers) == (1000, 64, 2)
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.from_preset("13b")
