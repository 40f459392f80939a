"""The reference code's per-layer options: scaled output init on chosen layers (scale_post_pre),
learnable residual gates (scale_res_pre_norm), the zeroed, frozen padding row -- against the formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_mixln.model import ModelConfig, build_model
from megatron_mixln.model.block import resolve_stream
from megatron_mixln.model.positions import select_layers
from model_reference import attn_ref, mlp_ref, norm_ref

SHAPE = dict(vocab_size=64, hidden_size=64, ffn_hidden_size=128, num_layers=6, num_attention_heads=4, norm_impl="torch")


def test_select_layers():
    positions = ("post", "post", "pre", "pre", "lns", "pre")
    assert select_layers(None, positions, "f") == ()
    assert select_layers("all", positions, "f") == (1, 2, 3, 4, 5, 6)
    assert select_layers("pre", positions, "f") == (3, 4, 6)
    assert select_layers("post", positions, "f") == (1, 2)
    assert select_layers("2,4-5", positions, "f") == (2, 4, 5)
    for bad, words in [("0", "outside"), ("3-9", "outside"), ("x", "not a layer number")]:
        with pytest.raises(ValueError, match=f"f: .*{words}"):
            select_layers(bad, positions, "f")


def test_scaled_output_init_on_the_pre_layers_only():
    """scale_post_pre: o_proj/down_proj std 0.02/sqrt(2L) on the Pre-LN layers, 0.02 on the Post-LN ones."""
    torch.manual_seed(0)
    big = dict(SHAPE, hidden_size=256, ffn_hidden_size=512)
    cfg = ModelConfig(**big, norm_position="mix", post_ln_layers=2, scaled_output_init_layers="pre")
    model = build_model(cfg)
    scaled = 0.02 / math.sqrt(2 * cfg.num_layers)
    for block in model.layers:
        want = scaled if block.position == "pre" else 0.02
        for lin in (block.attn.o_proj, block.mlp.down_proj):
            assert lin.weight.std().item() == pytest.approx(want, rel=0.05), (block.layer_number, want)
        assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="scaled_output_init_layers: give it or scaled_output_init"):
        ModelConfig(**SHAPE, scaled_output_init=True, scaled_output_init_layers="pre")


def _gated_ref(x, block, eps=1e-6):
    """h = x + g_a * Attn(N1(x)); y = h + g_m * MLP(N2(h)) (the reference's scale_res_pre_norm)."""
    h = x + block.attn_gate * attn_ref(norm_ref(x, block.attn_norm.weight, None, eps), block.attn, 10000.0)
    return h + block.mlp_gate * mlp_ref(norm_ref(h, block.mlp_norm.weight, None, eps), block.mlp)


def test_residual_gates_match_the_formula_and_train():
    cfg = ModelConfig(**SHAPE, norm_position="pre", residual_gate_layers="2-3", residual_gate_init=0.001)
    model = build_model(cfg)
    assert [b.gated for b in model.layers] == [False, True, True, False, False, False]
    block = model.layers[1]
    assert block.attn_gate.item() == pytest.approx(0.001) and block.mlp_gate.item() == pytest.approx(0.001)
    with torch.no_grad():
        block.attn_gate.fill_(0.7), block.mlp_gate.fill_(-0.3)
    x = torch.randn(2, 5, cfg.hidden_size)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref = resolve_stream(block(xa)), _gated_ref(xb, block)  # a handed-off pair (h, d) is h + d
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    params = [block.attn_gate, block.mlp_gate, block.attn.o_proj.weight]
    g = torch.randn(out.shape)
    for a, b in zip(torch.autograd.grad(out, [xa, *params], g), torch.autograd.grad(ref, [xb, *params], g)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    names = {n for n, _ in model.named_parameters()}
    assert {"layers.1.attn_gate", "layers.1.mlp_gate"} <= names and "layers.0.attn_gate" not in names


def test_residual_gates_refuse_post_layers():
    with pytest.raises(ValueError, match=r"residual_gate_layers: layers \[1\] are not pre/lns layers"):
        ModelConfig(**SHAPE, norm_position="mix", post_ln_layers=1, residual_gate_layers="all")


def test_frozen_pad_row_is_zero_and_never_trains():
    cfg = ModelConfig(**SHAPE, freeze_pad_embedding=True, pad_token_id=3, scaled_embedding_init=True)
    model = build_model(cfg)
    assert torch.count_nonzero(model.embed.weight[3]) == 0
    assert model.embed.weight[4].std().item() == pytest.approx(math.sqrt(2 / 5), rel=0.3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.tensor([[3, 5, 3, 7, 3, 9, 3, 11]])
    for _ in range(3):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(), loss.backward(), opt.step()
    assert torch.count_nonzero(model.embed.weight[3]) == 0  # fed as input, yet untouched
    with pytest.raises(ValueError, match="pad_token_id: 64 is outside the vocabulary"):
        ModelConfig(**SHAPE, freeze_pad_embedding=True, pad_token_id=64)
