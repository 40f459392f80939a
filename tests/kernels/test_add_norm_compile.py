"""torch.compile traces through add_norm: the PyTorch path with Inductor, the Triton path (custom
ops with fake impls and a registered backward) with no graph break; the ops pass opcheck."""
import pytest
import torch
from add_norm_reference import rel_err
from torch._subclasses.fake_tensor import FakeTensorMode
from triton_env import needs_kernels

from megatron_mixln.kernels.add_norm import add_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def two_norms(x, r, w, b, impl, kind):
    """A Pre-LN-like pair: the sum is carried on and normalised again (lns/deepnorm scales)."""
    y, s = add_norm(x, r, w, b, 1e-6, 1.5, 0.5, kind, impl)
    y2, _ = add_norm(y, s, w, b, 1e-6, 1.0, 1.0, kind, impl)
    return (y2 * y2).sum() + (s * s).sum()


def compiled_matches_eager(impl, kind, backend):
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*shape, generator=g).to(DEVICE).requires_grad_() for shape in [(2, 5, 33), (2, 5, 33), (33,), (33,)]]
    if kind == "rmsnorm":
        leaves[3] = None
    args = [t for t in leaves if t is not None]
    eager = two_norms(*leaves, impl, kind)
    grads_eager = torch.autograd.grad(eager, args)
    torch._dynamo.reset()
    compiled_fn = torch.compile(two_norms, backend=backend, fullgraph=True)  # fullgraph: a break is an error
    out = compiled_fn(*leaves, impl, kind)
    grads = torch.autograd.grad(out, args)
    assert rel_err(out, eager) < 1e-5
    for a, b in zip(grads, grads_eager):
        assert rel_err(a, b) < 1e-5


def test_compile_torch_path_inductor():
    # Inductor's CPU C++ codegen: ~10 s here on 2 cores for this function.
    compiled_matches_eager("torch", "layernorm", "inductor")


@needs_kernels
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_compile_triton_path_no_graph_break(kind):
    # aot_eager: Dynamo + AOTAutograd (which trace the custom ops through their fake impls and
    # put add_norm_bwd in the backward graph) without Inductor's slow CPU codegen.
    compiled_matches_eager("triton", kind, "aot_eager")


@needs_kernels
def test_fake_impls_give_shapes_and_dtypes():
    with FakeTensorMode():
        x = torch.empty(2, 3, 33, dtype=torch.bfloat16, device=DEVICE)
        w = torch.empty(33, dtype=torch.float32, device=DEVICE)
        y, s, rstd, mean = torch.ops.mixln.add_norm_fwd(x, x, w, w, 1e-6, 2.0, 1.0, False)
        assert (y.shape, y.dtype, s.shape, s.dtype) == (x.shape, torch.bfloat16, x.shape, torch.bfloat16)
        assert (rstd.shape, rstd.dtype, mean.shape) == ((6,), torch.float32, (6,))
        _, s, _, mean = torch.ops.mixln.add_norm_fwd(x, None, w, None, 1e-6, 1.0, 1.0, True)
        assert s.numel() == 0 and mean.numel() == 0
        dx, dr, dw, db = torch.ops.mixln.add_norm_bwd(x, None, x, w, rstd, rstd, 2.0, 1.0, True, True, True)
        assert (dx.shape, dx.dtype, dr.shape, dw.shape, dw.dtype, db.shape) == (
            x.shape, torch.bfloat16, x.shape, (33,), torch.float32, (33,))


@needs_kernels
@pytest.mark.parametrize("has_residual,is_rms", [(True, False), (False, True)])
def test_opcheck(has_residual, is_rms):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 20, generator=g).to(DEVICE).requires_grad_()
    r = torch.randn(3, 4, 20, generator=g).to(DEVICE).requires_grad_() if has_residual else None
    w = torch.randn(20, generator=g).to(DEVICE).requires_grad_()
    b = None if is_rms else torch.randn(20, generator=g).to(DEVICE).requires_grad_()
    torch.library.opcheck(torch.ops.mixln.add_norm_fwd.default, (x, r, w, b, 1e-6, 1.5, 0.5, is_rms))
    _, s, rstd, mean = torch.ops.mixln.add_norm_fwd(x, r, w, b, 1e-6, 1.5, 0.5, is_rms)
    saved = s if has_residual else x
    dy = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.mixln.add_norm_bwd.default,
        (dy, dy if has_residual else None, saved.detach(), w.detach(), rstd, mean, 1.5, 0.5, is_rms, not is_rms, has_residual),
    )
