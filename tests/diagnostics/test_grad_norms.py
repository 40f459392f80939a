import math

import torch

from megatron_mixln.diagnostics import flatten_grad_norms, layer_grad_norms
from megatron_mixln.model import ModelConfig, build_model


def _model_after_backward(position):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=4, num_attention_heads=4,
                      norm_position=position)
    model = build_model(cfg)
    tokens = torch.randint(0, 64, (2, 9))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1)).backward()
    return model


def _hand_norm(model, prefix):
    sq = sum(float((p.grad.double() ** 2).sum()) for n, p in model.named_parameters() if n.startswith(prefix))
    return math.sqrt(sq)


def test_one_entry_per_layer_and_sublayer_matching_hand_computed_norms():
    model = _model_after_backward("post*2,peri,pre")
    rows = layer_grad_norms(model)
    assert [r["layer"] for r in rows] == [1, 2, 3, 4]
    assert [r["position"] for r in rows] == ["post", "post", "peri", "pre"]
    for i, row in enumerate(rows):
        expected = {"attn", "mlp", "attn_norm", "mlp_norm"} | ({"attn_out_norm", "mlp_out_norm"} if i == 2 else set())
        assert set(row) - {"layer", "position"} == expected
        for key in expected:
            hand = _hand_norm(model, f"layers.{i}.{key}.")
            assert hand > 0
            assert math.isclose(row[key], hand, rel_tol=1e-9), (i, key)


def test_custom_grad_getter_and_flattening():
    model = _model_after_backward("pre")
    doubled = layer_grad_norms(model, get_grad=lambda p: None if p.grad is None else 2 * p.grad)
    plain = layer_grad_norms(model)
    assert all(math.isclose(d["mlp"], 2 * p["mlp"], rel_tol=1e-9) for d, p in zip(doubled, plain))
    flat = flatten_grad_norms(plain)
    assert len(flat) == 4 * 4 and flat["grad_norm/layer_03/attn"] == plain[2]["attn"]
