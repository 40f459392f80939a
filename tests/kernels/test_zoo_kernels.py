"""The norm zoo's Triton kernels (CPU interpreter here, compiled on a GPU) against float64 formulas written
here: add + DyT/Derf (forward, every gradient: x, residual, γ, β, α, s) and the reordered pattern
residual + norm(x); each dtype, with/without residual and scales, odd widths."""
import math

import pytest
import torch

pytest.importorskip("triton")

from triton_env import needs_kernels  # noqa: E402

from megatron_mixln.kernels.add_norm import add_norm, norm_add  # noqa: E402

pytestmark = needs_kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def pointwise_ref(x, r, w, b, alpha, shift, a, c, kind):
    """float64: s = a*r + x; y = c*(γ·tanh(α s) + β) (DyT, arXiv 2503.10622) or c*(γ·erf(α s + s0) + β) (Derf)."""
    s = x if r is None else a * r + x
    f = torch.tanh(alpha * s) if kind == "dyt" else torch.erf(alpha * s + shift)
    y = f * w + (0 if b is None else b)
    return c * y, s


def _leaves(shape, dtype, kind, residual, bias, gen):
    n = shape[-1]
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale)  # noqa: E731
    t = {"x": mk(*shape, scale=2.0), "w": 1 + 0.3 * mk(n), "alpha": 0.5 + 0.1 * mk(1)}
    if residual:
        t["r"] = mk(*shape, scale=2.0)
    if bias:
        t["b"] = 0.3 * mk(n)
    if kind == "derf":
        t["shift"] = 0.2 * mk(1)
    return {k: v.to(dtype if k in ("x", "r") else torch.float32).to(DEVICE).requires_grad_(True) for k, v in t.items()}, \
        {k: v.to(DEVICE).requires_grad_(True) for k, v in t.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind, residual, bias, a, c", [
    ("dyt", True, False, 1.0, 1.0), ("dyt", False, True, 1.0, 0.5), ("dyt", True, True, 1.7, 1.0),
    ("derf", True, True, 1.0, 1.0), ("derf", False, True, 1.0, 1.0), ("derf", True, True, 2.0, 0.7)])
def test_add_pointwise_matches_float64(kind, residual, bias, a, c, dtype):
    gen = torch.Generator().manual_seed(0)
    got_in, ref_in = _leaves((3, 37, 100), dtype, kind, residual, bias, gen)  # 111 rows of 100: several programs
    y, s = add_norm(got_in["x"], got_in.get("r"), got_in["w"], got_in.get("b"), 1e-6, a, c, kind, "triton",
                    got_in["alpha"], got_in.get("shift"))
    y_ref, s_ref = pointwise_ref(ref_in["x"], ref_in.get("r"), ref_in["w"], ref_in.get("b"), ref_in["alpha"],
                                 ref_in.get("shift"), a, c, kind)
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref, atol=tol, rtol=tol)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    gs = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(DEVICE) if residual else None
    outs, ref_outs = [y], [y_ref]
    grads, ref_grads = [gy.to(y.dtype)], [gy]
    if residual:
        torch.testing.assert_close(s.double(), s_ref, atol=tol, rtol=tol)
        outs.append(s), ref_outs.append(s_ref), grads.append(gs.to(s.dtype)), ref_grads.append(gs)
    names = list(got_in)
    g = torch.autograd.grad(outs, [got_in[k] for k in names], grads)
    g_ref = torch.autograd.grad(ref_outs, [ref_in[k] for k in names], ref_grads)
    for name, a_, b_ in zip(names, g, g_ref):
        scale = max(1.0, float(b_.abs().max()))  # α's and γ's gradients sum thousands of terms
        torch.testing.assert_close(a_.double() / scale, b_ / scale, atol=tol * 4, rtol=tol * 4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("n", [100, 33])
def test_norm_add_matches_float64(kind, dtype, n):
    """residual + norm(x) (OLMo 2's reordered pattern) in one kernel; the residual stream in fp32."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 29, n, generator=gen, dtype=torch.float64) * 3).to(DEVICE)
    r = torch.randn(4, 29, n, generator=gen, dtype=torch.float64).to(DEVICE)
    w = (1 + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)).to(DEVICE)
    b = 0.3 * torch.randn(n, generator=gen, dtype=torch.float64).to(DEVICE) if kind == "layernorm" else None
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, r, w) + ((b,) if b is not None else ())]
    got_leaves = [ref_leaves[0].detach().to(dtype).requires_grad_(True), ref_leaves[1].detach().float().requires_grad_(True)]
    got_leaves += [t.detach().float().requires_grad_(True) for t in ref_leaves[2:]]
    xr, rr, wr = ref_leaves[:3]
    br = ref_leaves[3] if b is not None else None
    mu = xr.mean(-1, keepdim=True) if kind == "layernorm" else 0
    xc = xr - mu
    y_ref = rr + xc / torch.sqrt((xc * xc).mean(-1, keepdim=True) + 1e-6) * wr + (0 if br is None else br)
    y = norm_add(got_leaves[0], got_leaves[1], got_leaves[2], got_leaves[3] if b is not None else None, 1e-6, kind,
                 "triton")
    assert y.dtype == torch.float32  # the promoted dtype: the fp32 stream stays fp32
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref, atol=tol * 3, rtol=tol)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    g = torch.autograd.grad(y, got_leaves, gy.float())
    g_ref = torch.autograd.grad(y_ref, ref_leaves, gy)
    for i, (a_, b_) in enumerate(zip(g, g_ref)):
        scale = max(1.0, float(b_.abs().max()))
        torch.testing.assert_close(a_.double() / scale, b_ / scale, atol=tol * 4, rtol=tol * 4, msg=f"grad {i}")


def test_model_runs_the_zoo_kernels_like_torch():
    """A reordered + DyT model built with --norm-impl triton computes the --norm-impl torch model's loss."""
    from megatron_mixln.model import ModelConfig, build_model

    losses = {}
    for impl in ("torch", "triton"):
        for kind in ("RMSNorm", "DyT"):
            cfg = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=3, num_attention_heads=4,
                              norm_position="reordered,pre,hybrid", normalization=kind, norm_impl=impl)
            torch.manual_seed(0)
            model = build_model(cfg).to(DEVICE)
            tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
            loss = model(tokens).float().logsumexp(-1).mean()
            loss.backward()
            losses[impl, kind] = (float(loss.detach()), float(model.layers[0].attn_norm.weight.grad.abs().sum()))
    for kind in ("RMSNorm", "DyT"):
        assert math.isclose(losses["torch", kind][0], losses["triton", kind][0], rel_tol=1e-5)
        assert math.isclose(losses["torch", kind][1], losses["triton", kind][1], rel_tol=1e-4)
