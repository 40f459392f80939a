"""SiameseNorm and ResiDual against naive float64 forwards written from the papers' equations
(arXiv 2602.08064 as its official code's post_pre block (DeiT/DiT files) and hybrid_pre block (OLMo file);
arXiv 2304.14802 as microsoft/ResiDual)."""
import math

import pytest
import torch

from megatron_mixln.model import ModelConfig, build_model
from megatron_mixln.training.model_setup import apply_activation_checkpointing, apply_compile
from model_reference import attn_ref, mlp_ref, norm_ref


def _cfg(position, **kw):
    if position == "siamese-hybrid_pre":
        position, kw = "siamese", {**kw, "siamese_variant": "hybrid_pre"}
    return ModelConfig(vocab_size=50, hidden_size=32, ffn_hidden_size=48, num_layers=3, num_attention_heads=4,
                       num_query_groups=2, norm_position=position, norm_impl="torch", **kw)


def _model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm gains start at 1: randomise them so a swapped or skipped norm shows
        for name, p in model.named_parameters():
            if "norm" in name or "scale" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def siamese_ref(model, tokens):
    """X_0 = Y_0 = E; per sublayer F of layer l: X <- N_x(X); O = F(N_in(X + N_y(Y)));
    X <- X + O/sqrt(2l); Y <- Y + O. Logits = W_head N_f(N_fx(X) + N_fy(Y))."""
    cfg = model.config
    N = lambda n, t: norm_ref(t, n.weight, n.bias, cfg.norm_epsilon)  # noqa: E731
    x = y = model.embed.weight[tokens]
    for l, b in enumerate(model.layers, start=1):
        c = math.sqrt(2 * l)
        for F, nx, ny, nin in ((lambda t: attn_ref(t, b.attn, cfg.rotary_base), b.attn_x_norm, b.attn_y_norm, b.attn_norm),
                               (lambda t: mlp_ref(t, b.mlp), b.mlp_x_norm, b.mlp_y_norm, b.mlp_norm)):
            x = N(nx, x)
            o = F(N(nin, x + N(ny, y)))
            x, y = x + o / c, y + o
    f = model.final_norm
    return N(f.out_norm, N(f.x_norm, x) + N(f.y_norm, y)) @ model.lm_head.weight.T


def siamese_hybrid_pre_ref(model, tokens):
    """OLMo_model_hybrid_pre.py's OLMoSequentialBlock with attn_norm off and ffn_norm on (residual after
    the norm): X_0 = Y_0 = E; attention: O = Attn(c1 X + N_y(Y)); X <- X + O/c; Y <- Y + O;
    MLP: X <- N_x(X); O = MLP(N_in(X + N_y'(Y))); X <- X + O/c; Y <- Y + O (c = sqrt(2l)).
    Logits = W_head N_f(N_fx(X) + N_fy(Y))."""
    cfg = model.config
    N = lambda n, t: norm_ref(t, n.weight, n.bias, cfg.norm_epsilon)  # noqa: E731
    x = y = model.embed.weight[tokens]
    for l, b in enumerate(model.layers, start=1):
        c = math.sqrt(2 * l)
        o = attn_ref(b.attn_x_scale.weight * x + N(b.attn_y_norm, y), b.attn, cfg.rotary_base)
        x, y = x + o / c, y + o
        x = N(b.mlp_x_norm, x)
        o = mlp_ref(N(b.mlp_norm, x + N(b.mlp_y_norm, y)), b.mlp)
        x, y = x + o / c, y + o
    f = model.final_norm
    return N(f.out_norm, N(f.x_norm, x) + N(f.y_norm, y)) @ model.lm_head.weight.T


def residual_dual_ref(model, tokens):
    """x_0 = d_0 = E; per sublayer: d <- d + F(x); x <- LN(x + F(x)). Logits = W_head (x_L + LN_d(d_L))."""
    cfg = model.config
    N = lambda n, t: norm_ref(t, n.weight, n.bias, cfg.norm_epsilon)  # noqa: E731
    x = d = model.embed.weight[tokens]
    for b in model.layers:
        for F, n in ((lambda t: attn_ref(t, b.attn, cfg.rotary_base), b.attn_norm), (lambda t: mlp_ref(t, b.mlp), b.mlp_norm)):
            o = F(x)
            x, d = N(n, x + o), d + o
    return (x + N(model.final_norm.d_norm, d)) @ model.lm_head.weight.T


REFS = {"siamese": siamese_ref, "siamese-hybrid_pre": siamese_hybrid_pre_ref, "residual-dual": residual_dual_ref}


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("position", list(REFS))
def test_forward_and_gradients_match_the_papers_equations(position, normalization):
    model = _model(_cfg(position, normalization=normalization))
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    out, ref = model(tokens), REFS[position](model, tokens)
    # the model's norms compute their statistics in fp32 (add_norm), hence not 1e-12
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    params = dict(model.named_parameters())
    g_out = torch.autograd.grad(out.square().sum(), list(params.values()))
    g_ref = torch.autograd.grad(ref.square().sum(), list(params.values()))
    for name, a, b in zip(params, g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("position", list(REFS))
def test_recompute_and_compile_give_the_same_loss_and_grads(position):
    cfg = _cfg(position, normalization="RMSNorm")
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    results = []
    for how in ("plain", "recompute", "compile"):
        torch.manual_seed(0)
        model = build_model(cfg)
        if how == "recompute":
            apply_activation_checkpointing(model)
        if how == "compile":
            apply_compile(model)
        loss = model(tokens).float().logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        for n, g in grads.items():
            torch.testing.assert_close(g, results[0][1][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("spec", ["siamese,pre,pre", "pre*2,residual-dual", "siamese*2,residual-dual"])
def test_lists_that_start_or_drop_the_second_stream_are_refused(spec):
    with pytest.raises(ValueError, match=r"^--norm-position: .* must be the position of every layer"):
        _cfg(spec)


def test_a_list_of_one_two_stream_position_is_that_position():
    assert _cfg("siamese*3").positions == _cfg("siamese").positions == ("siamese",) * 3
    assert _cfg("residual_dual").positions == ("residual-dual",) * 3


def test_no_final_norm_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="^--no-final-norm: .*siamese"):
        _cfg("siamese", final_norm=False)


def test_hybrid_pre_has_c1_at_one_and_four_norms_per_layer():
    model = build_model(_cfg("siamese-hybrid_pre"))
    block = model.layers[1]
    assert torch.equal(block.attn_x_scale.weight, torch.ones(32))
    assert sorted(n for n, _ in block.named_children() if n.endswith("norm")) == [
        "attn_y_norm", "mlp_norm", "mlp_x_norm", "mlp_y_norm"]


def test_siamese_variant_is_refused_on_other_positions_and_unknown_names():
    with pytest.raises(ValueError, match="^--siamese-variant hybrid_pre: only applies to --norm-position siamese"):
        _cfg("pre", siamese_variant="hybrid_pre")
    with pytest.raises(ValueError, match="^--siamese-variant: unknown 'hc'"):
        _cfg("siamese", siamese_variant="hc")
