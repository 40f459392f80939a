"""Cross-block fusion: a pre/lns/peri layer's last residual add moved into the next layer's first norm
(or the final norm) gives the same logits and gradients as the unfused model, for every boundary."""
import pytest
import torch
import torch.nn.functional as F

from megatron_mixln.kernels.traffic import TrafficCounter
from megatron_mixln.model import ModelConfig, build_model
from megatron_mixln.model.block import resolve_stream
from megatron_mixln.model.positions import parse_position_list
from megatron_mixln.training.model_setup import apply_activation_checkpointing

# every kind of boundary: pre->pre, lns->lns, peri->peri, pre->post, post->pre, peri->pre, pre->peri,
# lns->post, deepnorm->lns, the last layer into the final norm (and without one)
MIXES = {
    "pre": "pre*3",
    "lns": "lns*3",
    "peri": "peri*3",
    "mix": "post,post,pre,pre",
    "pre_post_pre": "pre,post,pre",
    "every": "pre,peri,lns,post,deepnorm,lns,deeppost,peri",
    "ends_post": "peri,pre,post",
}
EXPECTED_PLAN = {  # which layers hand their last add on (final norm present)
    "pre": [True, True, True],
    "lns": [True, True, True],
    "peri": [True, True, True],
    "mix": [False, False, True, True],
    "pre_post_pre": [False, False, True],
    "every": [True, True, False, False, False, False, False, True],
    "ends_post": [True, False, False],
}


def config(positions, **kw):
    return ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=len(parse_position_list(positions)),
                       num_attention_heads=4, seq_length=12, norm_position=positions, **{"norm_impl": "torch", **kw})


def pair(positions, **kw):
    """(fused, unfused) models with the same weights (norm gains and biases randomised)."""
    torch.manual_seed(0)
    fused = build_model(config(positions, **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    unfused = build_model(config(positions, cross_block_fusion=False, **kw))
    unfused.load_state_dict(fused.state_dict())
    return fused, unfused


def logits_and_grads(model, tokens, amp=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.roll(-1, 1).flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def tokens(cfg, batch=3):
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length), generator=torch.Generator().manual_seed(2))


def assert_same(a, b, atol=1e-6, rtol=1e-5):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, atol=atol, rtol=rtol)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=rtol, msg=f"grad of {name}")


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_fused_equals_unfused(mix, normalization):
    fused, unfused = pair(MIXES[mix], normalization=normalization)
    assert [b.hand_off_residual for b in fused.layers] == EXPECTED_PLAN[mix]
    assert not any(b.hand_off_residual for b in unfused.layers)
    t = tokens(fused.config)
    a, b = logits_and_grads(fused, t), logits_and_grads(unfused, t)
    # fp32: the same sums in the same order forward, so the logits are bitwise equal
    assert torch.equal(a[0], b[0])
    assert_same(a, b)


@pytest.mark.parametrize("mix", ["mix", "every"])
def test_fused_equals_unfused_without_final_norm_and_under_bf16_autocast(mix):
    fused, unfused = pair(MIXES[mix], final_norm=False)
    assert not fused.layers[-1].hand_off_residual  # nothing after it to take the add
    t = tokens(fused.config)
    assert_same(logits_and_grads(fused, t), logits_and_grads(unfused, t))
    fused, unfused = pair(MIXES[mix])
    assert_same(logits_and_grads(fused, t, amp=True), logits_and_grads(unfused, t, amp=True), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mix", ["peri", "mix", "every"])
def test_fused_with_activation_recomputation_equals_unfused(mix):
    fused, unfused = pair(MIXES[mix])
    apply_activation_checkpointing(fused)
    t = tokens(fused.config)
    assert_same(logits_and_grads(fused, t), logits_and_grads(unfused, t))


def test_layers_called_one_by_one_and_layer_removal_still_exact():
    """Direct callers see (h, d) pairs; resolve_stream turns them into the layer's output, and a
    post layer that receives a pair (its predecessor removed) adds it itself."""
    fused, unfused = pair(MIXES["every"])
    t = tokens(fused.config)
    with torch.no_grad():
        hf, hu = fused.embed(t), unfused.embed(t)
        for lf, lu in zip(fused.layers, unfused.layers):
            hf, hu = lf(hf), lu(hu)
            assert torch.equal(resolve_stream(hf), hu)
        for i in range(len(fused.layers)):  # drop layer i: pre/peri before a post now hands off into it
            keep = [j for j in range(len(fused.layers)) if j != i]
            layers_f, layers_u = fused.layers, unfused.layers
            fused.layers = torch.nn.ModuleList(layers_f[j] for j in keep)
            unfused.layers = torch.nn.ModuleList(layers_u[j] for j in keep)
            assert torch.equal(fused(t), unfused(t)), i
            fused.layers, unfused.layers = layers_f, layers_u


def _hidden_adds(model, t):
    """aten.add calls on (batch, seq, hidden) tensors in forward, and add_norm calls."""
    hidden = model.config.hidden_size
    adds = 0

    class Adds(TrafficCounter):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal adds
            if str(func) == "aten.add.Tensor" and all(isinstance(a, torch.Tensor) and a.dim() == 3
                                                      and a.shape[-1] == hidden for a in args[:2]):
                adds += 1
            return super().__torch_dispatch__(func, types, args, kwargs)

    with Adds() as counter, torch.no_grad():
        model(t)
    return adds, counter


@pytest.mark.parametrize("mix", list(MIXES))
def test_one_add_norm_per_boundary_and_no_separate_add(monkeypatch, mix):
    """Fused, a handed-off boundary costs one add_norm call and no stand-alone residual add."""
    import megatron_mixln.model.norms as norms

    calls = []
    real = norms.add_norm

    def counted(x, residual, *a, **k):
        calls.append(residual is not None)
        return real(x, residual, *a, **k)

    monkeypatch.setattr(norms, "add_norm", counted)
    fused, unfused = pair(MIXES[mix])
    t = tokens(fused.config)
    handoffs = sum(b.hand_off_residual for b in fused.layers)
    calls.clear()
    fused_adds, _ = _hidden_adds(fused, t)
    fused_calls = list(calls)
    calls.clear()
    unfused_adds, _ = _hidden_adds(unfused, t)
    # the same number of add_norm calls, `handoffs` more of them now with a residual...
    assert len(fused_calls) == len(calls)
    assert sum(fused_calls) == sum(calls) + handoffs
    # ...and (torch path: the add moves inside add_norm) the stand-alone adds outside norms are gone
    outside_fused = fused_adds - sum(fused_calls)
    outside_unfused = unfused_adds - sum(calls)
    assert outside_unfused - outside_fused == handoffs
