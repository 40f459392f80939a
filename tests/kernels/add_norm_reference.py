"""The add + norm formula in float64, written out independently of every implementation under test."""
import torch


def reference(x, residual, weight, bias, eps, residual_scale=1.0, out_scale=1.0, kind="rmsnorm"):
    """float64 leaves in, float64 (normed, s) out; differentiate it with autograd for the grads."""
    s = x if residual is None else residual_scale * residual + x
    if kind == "rmsnorm":
        s_hat = s / torch.sqrt((s * s).mean(-1, keepdim=True) + eps)
    else:
        centred = s - s.mean(-1, keepdim=True)
        s_hat = centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + eps)
    y = s_hat * weight + (0.0 if bias is None else bias)
    return y * out_scale, s


def rel_err(actual, expected):
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# Relative (Frobenius) error allowed per storage dtype. bf16/fp16 outputs are rounded once (the
# CPU interpreter even truncates fp32->bf16 instead of rounding to nearest), and the backward
# re-normalises the rounded sum it saved, so gradients carry about one more rounding.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
