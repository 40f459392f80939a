"""`add_norm`'s dispatch: impl/kind validation, `auto`, and clear errors where a backend cannot run."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from add_norm_reference import TOL, reference, rel_err

from megatron_mixln.kernels.add_norm import add_norm, resolve_impl


def _inputs(n=16, kind="rmsnorm"):
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(3, n, generator=g), torch.randn(3, n, generator=g)
    w = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g) if kind == "layernorm" else None
    return x, r, w, b


def test_unknown_impl_and_kind():
    x, r, w, b = _inputs()
    with pytest.raises(ValueError, match="unknown implementation 'cudnn'.*auto, torch, triton, apex"):
        add_norm(x, r, w, b, 1e-6, impl="cudnn")
    with pytest.raises(ValueError, match="unknown kind 'batchnorm'"):
        add_norm(x, r, w, b, 1e-6, kind="batchnorm", impl="torch")


def test_auto_is_torch_off_cuda():
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("torch", torch.device("cuda")) == "torch"
    assert resolve_impl("triton", torch.device("cpu")) == "triton"  # asked for explicitly: no fallback


def test_apex_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # as if not installed, whatever this machine has
    x, r, w, b = _inputs()
    with pytest.raises(ImportError, match=r"--norm-impl apex.*NVIDIA/apex.*--norm-impl triton"):
        add_norm(x, r, w, b, 1e-6, impl="apex")


def _fake_apex(monkeypatch, calls):
    """apex.normalization.fused_layer_norm with apex's signatures, computed in torch."""
    def rms(input, weight, normalized_shape, eps=1e-6):
        calls.append(("rms", input.dtype, weight.dtype, tuple(normalized_shape), eps))
        return input * torch.rsqrt(input.pow(2).mean(-1, keepdim=True) + eps) * weight

    def ln(input, weight, bias, normalized_shape, eps=1e-6):
        calls.append(("ln", input.dtype, weight.dtype, tuple(normalized_shape), eps))
        return torch.nn.functional.layer_norm(input, normalized_shape, weight, bias, eps)

    mod = types.ModuleType("apex.normalization.fused_layer_norm")
    mod.fused_rms_norm_affine, mod.fused_layer_norm_affine = rms, ln
    for name, m in [("apex", types.ModuleType("apex")), ("apex.normalization", types.ModuleType("x")),
                    ("apex.normalization.fused_layer_norm", mod)]:
        monkeypatch.setitem(sys.modules, name, m)
    sys.modules["apex"].normalization = sys.modules["apex.normalization"]
    sys.modules["apex.normalization"].fused_layer_norm = mod


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_apex_wrapper_does_the_add_and_scales(monkeypatch, kind):
    """apex fuses only the norm: the wrapper's add, residual scale and output scale are checked
    against the reference with a stand-in apex module (real apex needs CUDA)."""
    calls = []
    _fake_apex(monkeypatch, calls)
    x, r, w, b = (t.to(torch.bfloat16) if t is not None else None for t in _inputs(24, kind))
    y, s = add_norm(x, r, w, b, 1e-5, residual_scale=1.7, out_scale=0.3, kind=kind, impl="apex")
    y_ref, s_ref = reference(x.double(), r.double(), w.double(), None if b is None else b.double(),
                             1e-5, 1.7, 0.3, kind)
    assert y.dtype == s.dtype == torch.bfloat16
    assert rel_err(y, y_ref) < TOL[torch.bfloat16] and rel_err(s, s_ref) < TOL[torch.bfloat16]
    assert calls == [("rms" if kind == "rmsnorm" else "ln", torch.float32, torch.float32, (24,), 1e-5)]


def test_triton_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron_mixln.kernels.triton_add_norm", None)
    x, r, w, b = _inputs()
    with pytest.raises(ImportError, match="--norm-impl triton needs the triton package"):
        add_norm(x, r, w, b, 1e-6, impl="triton")


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from megatron_mixln.kernels.add_norm import add_norm\n"
        "try:\n"
        "    add_norm(torch.randn(2, 8), None, torch.ones(8), None, 1e-6, impl='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU tensor even on a GPU machine
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parents[2])
    assert "ERROR: --norm-impl triton needs CUDA tensors, got a cpu tensor" in out.stdout, out.stdout + out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout and "--norm-impl torch" in out.stdout
