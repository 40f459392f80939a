"""A whole tiny model with every norm position gives the same logits and gradients with
norm_impl="triton" (the fused kernels) as with norm_impl="torch"."""
import pytest
import torch
from add_norm_reference import rel_err
from triton_env import needs_kernels

from megatron_mixln.kernels import add_norm_kernels
from megatron_mixln.model import ModelConfig, Norm, build_model

pytestmark = needs_kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EVERY_POSITION = "pre,post,peri,lns,deepnorm,deeppost"


def tiny_config(**kw):
    return ModelConfig(vocab_size=64, hidden_size=48, ffn_hidden_size=80, num_layers=6, num_attention_heads=4,
                       seq_length=16, norm_position=EVERY_POSITION, **kw)


def logits_and_grads(model, tokens, run=None):
    """`run` (default: the model itself) may be a compiled wrapper of `model`."""
    logits = (model if run is None else run)(tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.roll(-1, 1).flatten())
    loss.backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def count_kernel_calls(monkeypatch):
    calls = {"fwd": 0, "bwd": 0}
    for name in calls:
        launcher = getattr(add_norm_kernels, f"add_norm_{name}")

        def counted(*args, _launcher=launcher, _name=name):
            calls[_name] += 1
            return _launcher(*args)

        monkeypatch.setattr(add_norm_kernels, f"add_norm_{name}", counted)
    return calls


def randomise_norms(model):
    with torch.no_grad():  # non-trivial gains and biases, so their gradients mean something
        for m in model.modules():
            if isinstance(m, Norm):
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.2, 0.2)


# norms per model: pre/lns/post/deepnorm/deeppost 2 each, peri 4, final 1
NORM_CALLS = 5 * 2 + 4 + 1


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_triton_model_matches_torch_model(normalization, monkeypatch):
    torch.manual_seed(0)
    ref = build_model(tiny_config(normalization=normalization, norm_impl="torch"), device=DEVICE)
    randomise_norms(ref)
    fused = build_model(tiny_config(normalization=normalization, norm_impl="triton"), device=DEVICE)
    fused.load_state_dict(ref.state_dict())
    assert {m.impl for m in fused.modules() if isinstance(m, Norm)} == {"triton"}
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    logits_ref, grads_ref = logits_and_grads(ref, tokens)
    calls = count_kernel_calls(monkeypatch)
    logits, grads = logits_and_grads(fused, tokens)
    assert calls == {"fwd": NORM_CALLS, "bwd": NORM_CALLS}
    assert rel_err(logits, logits_ref) < 1e-5
    bad = {n: e for n, g in grads.items() if (e := rel_err(g, grads_ref[n])) > 1e-4}
    assert not bad, bad


def test_compiled_triton_model_has_no_graph_break(monkeypatch):
    """fullgraph=True: Dynamo must trace every norm position's custom-op calls without a break."""
    torch.manual_seed(0)
    model = build_model(tiny_config(normalization="LayerNorm", norm_impl="triton"), device=DEVICE)
    randomise_norms(model)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logits_eager, grads_eager = logits_and_grads(model, tokens)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    calls = count_kernel_calls(monkeypatch)
    logits, grads = logits_and_grads(model, tokens, run=compiled)
    assert calls["fwd"] >= NORM_CALLS and calls["bwd"] >= NORM_CALLS  # (+ fake-tensor tracing runs)
    assert rel_err(logits, logits_eager) < 1e-6
    for n, g in grads.items():
        assert rel_err(g, grads_eager[n]) < 1e-5, n
