"""The stability probe against an independent float64 computation: forward hooks on a float64 copy
of the model, explicit q/k projections, RoPE, causal mask and softmax written out here, and the
weights before/after an SGD step compared directly."""
import copy
import math

import numpy as np
import pytest
import torch

from megatron_mixln.diagnostics.stability import DIAGNOSTICS, StabilityProbe, parse_diagnostics
from megatron_mixln.model import ModelConfig, build_model

VOCAB, SEQ = 64, 12


def _config(**overrides):
    # post/peri/pre/lns: handed-off residual pairs between pre-like layers, normalised post outputs, GQA
    return ModelConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=48, num_layers=4,
                                 num_attention_heads=4, num_query_groups=2, seq_length=SEQ,
                                 norm_position="post,peri,pre,lns", norm_impl="torch"), **overrides})


def _rope64(x, base):
    """RoPE, rotate-half layout, in float64: x (batch, heads, seq, dim)."""
    dim, seq = x.shape[-1], x.shape[-2]
    inv = 1.0 / (base ** (np.arange(0, dim, 2) / dim))
    ang = np.outer(np.arange(seq), inv)
    ang = np.concatenate([ang, ang], -1)
    cos, sin = torch.tensor(np.cos(ang)), torch.tensor(np.sin(ang))
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _reference(model, tokens):
    """Every diagnostic of `model` on `tokens`, from a float64 copy with forward hooks."""
    ref = copy.deepcopy(model).double().requires_grad_(False)
    seen = {}

    def resolve(x, block):
        if not isinstance(x, tuple):
            return x
        # two-stream layers: the second (un-normalised) stream; otherwise a handed-off pair h + d
        return x[1] if block.position in ("siamese", "residual-dual") else x[0] + x[1]

    for block in ref.layers:
        block.register_forward_hook(lambda m, a, o: seen.__setitem__(("block", m.layer_number),
                                                                     (resolve(a[0], m), resolve(o, m))))
        block.attn.register_forward_hook(lambda m, a, o, n=block.layer_number: seen.__setitem__(("attn", n), a[0]))
    ref.lm_head.register_forward_hook(lambda m, a, o: seen.__setitem__("logits", o))
    with torch.no_grad():
        ref(tokens)
    out = {}
    for block in ref.layers:
        n, tag = block.layer_number, f"layer_{block.layer_number:02d}"
        x, y = (t.numpy() for t in seen[("block", n)])
        a = np.sort(np.abs(y).ravel())
        s2 = (y.reshape(-1, y.shape[-1]) ** 2).mean(0)
        out[f"act_rms_in/{tag}"] = math.sqrt((x ** 2).mean())
        out[f"act_rms_out/{tag}"] = math.sqrt((y ** 2).mean())
        out[f"act_max/{tag}"] = a[-1]
        out[f"act_max_over_median/{tag}"] = a[-1] / a[(a.size - 1) // 2]  # the lower median
        out[f"act_kurtosis/{tag}"] = (s2 ** 2).mean() / s2.mean() ** 2
        h = seen[("attn", n)]
        attn, b, s = block.attn, h.shape[0], h.shape[1]
        d = attn.head_dim
        q = (h @ attn.q_proj.weight.T).view(b, s, -1, d).transpose(1, 2)
        k = (h @ attn.k_proj.weight.T).view(b, s, -1, d).transpose(1, 2)
        q, k = _rope64(q, attn.rotary_base), _rope64(k, attn.rotary_base)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        masked = logits.masked_fill(~causal, -math.inf)
        p = masked.exp() / masked.exp().sum(-1, keepdim=True)  # explicit softmax
        ent = -(p * torch.where(causal, p.log(), torch.zeros(()))).sum(-1)  # (b, heads, s)
        for head in range(q.shape[1]):
            out[f"attn_logit_max/{tag}/head_{head:02d}"] = float(logits[:, head][:, causal].max())
            out[f"attn_entropy/{tag}/head_{head:02d}"] = float(ent[:, head].mean())
    lse = seen["logits"].exp().sum(-1).log()
    out["z_mean"], out["z_max"] = float(lse.mean()), float(lse.max())
    return out


@pytest.mark.parametrize("positions", ["post,peri,pre,lns", "siamese", "residual-dual"])
def test_every_diagnostic_matches_a_float64_reference(positions):
    torch.manual_seed(0)
    cfg = _config(norm_position=positions)
    model = build_model(cfg)
    if positions.startswith("post"):
        assert any(b.hand_off_residual for b in model.layers)  # pairs between layers are resolved
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    micro = [torch.randint(0, VOCAB, (2, SEQ + 1), generator=g) for _ in range(2)]
    expected = _reference(model, micro[0][:, :-1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    rng = torch.get_rng_state()
    with StabilityProbe(model, DIAGNOSTICS) as probe:
        for tokens in micro:  # two micro-batches: the probe reads the first one only
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
    got = probe.results()
    assert torch.equal(torch.get_rng_state(), rng)  # no random numbers drawn
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=2e-5, abs=1e-6), key
    for block in model.layers:
        tag = f"layer_{block.layer_number:02d}"
        names = [f"layers.{block.layer_number - 1}.{n}" for n, _ in block.named_parameters()]
        w2 = sum(float(model.get_parameter(n).double().pow(2).sum()) for n in names)
        d2 = sum(float((model.get_parameter(n).double() - before[n]).pow(2).sum()) for n in names)
        assert got[f"weight_norm/{tag}"] == pytest.approx(math.sqrt(w2), rel=1e-9)
        assert got[f"update_ratio/{tag}"] == pytest.approx(math.sqrt(d2 / w2), rel=1e-6)
        assert got[f"update_ratio/{tag}"] > 0
        heads = [expected[f"attn_logit_max/{tag}/head_{h:02d}"] for h in range(cfg.num_attention_heads)]
        assert got[f"attn_logit_max/{tag}"] == pytest.approx(max(heads), rel=2e-5)


def test_the_step_computes_the_same_numbers_with_the_probe():
    """Hooks on, same loss and gradients bit for bit (no_grad, detached, no RNG)."""
    grads = []
    for probe_on in (False, True):
        torch.manual_seed(0)
        model = build_model(_config())
        tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
        probe = StabilityProbe(model, DIAGNOSTICS) if probe_on else None
        if probe:
            probe.__enter__()
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        if probe:
            probe.__exit__(None, None, None)
        grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_long_sequences_are_chunked_to_the_same_answer(monkeypatch):
    import megatron_mixln.diagnostics.stability as stability

    q, k = torch.randn(2, 4, 40, 8), torch.randn(2, 2, 40, 8)
    whole = stability.attention_stats(q, k)
    monkeypatch.setattr(stability, "_CHUNK_ELEMENTS", 2 * 4 * 40 * 3)  # 3 query rows per chunk
    chunked = stability.attention_stats(q, k)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


def test_names_are_checked_naming_the_flag():
    assert parse_diagnostics("attention, logits") == ("attention", "logits")
    with pytest.raises(ValueError, match=r"--diagnostics: unknown 'attn'; allowed .*activations, attention"):
        parse_diagnostics("attn,logits")
