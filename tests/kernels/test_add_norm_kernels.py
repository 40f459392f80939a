"""The Triton add+norm kernels (CPU interpreter here, compiled on a GPU) against a float64 reference:
forward and every gradient, each dtype, with/without residual, scales, bias, odd and non-contiguous."""
import pytest
import torch

pytest.importorskip("triton")

from add_norm_cases import CASES, DEVICE, assert_close, run_case  # noqa: E402
from triton_env import needs_kernels  # noqa: E402

from megatron_mixln.kernels import triton_add_norm  # noqa: E402
from megatron_mixln.kernels.reference import add_norm_torch  # noqa: E402
from megatron_mixln.kernels.add_norm_kernels import launch_config, num_warps  # noqa: E402

pytestmark = needs_kernels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["rmsnorm", "layernorm"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_reference(kind, dtype, case):
    # 3*37 = 111 rows of 100: several forward programs and several backward programs (the last
    # with a partial tile); 100 is not a power of two, so the column masks matter.
    got, ref = run_case(triton_add_norm.add_norm_triton, kind, dtype, (3, 37, 100), case)
    assert_close(got, ref, dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 33, 5000])
def test_triton_odd_hidden_sizes(kind, n):
    # 5000 -> BLOCK_N 8192, one row per program; 1 -> a degenerate row (LayerNorm gives y = b).
    got, ref = run_case(triton_add_norm.add_norm_triton, kind, torch.float32, (2, 3, n), "deepnorm+grad")
    assert_close(got, ref, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_triton_noncontiguous_inputs(kind):
    got, ref = run_case(triton_add_norm.add_norm_triton, kind, torch.float32, (5, 7, 33), "pre", noncontig=True)
    assert_close(got, ref, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_triton_mixed_dtypes(kind):
    # bf16 activations with fp32 weights (mixed precision) and an fp32 residual stream: the outputs
    # are fp32 (the stream stays fp32, as eager bf16 + fp32 would), x's gradient bf16.
    got, ref = run_case(
        triton_add_norm.add_norm_triton, kind, torch.bfloat16, (4, 9, 48), "deepnorm+grad",
        w_dtype=torch.float32, r_dtype=torch.float32,
    )
    assert got["y"].dtype == got["s"].dtype == torch.float32 and got["dx"].dtype == torch.bfloat16
    assert_close(got, ref, torch.bfloat16)


@pytest.mark.parametrize("kind", KINDS)
def test_triton_bf16_residual_in_fp32_model(kind):
    # fp32 activations, a bf16 residual: s and every grad but the residual's are fp32; the
    # residual's grad is rounded to bf16 (its dtype), hence the bf16 tolerance.
    got, ref = run_case(
        triton_add_norm.add_norm_triton, kind, torch.float32, (4, 9, 48), "deepnorm+grad", r_dtype=torch.bfloat16,
    )
    assert got["s"].dtype == got["dx"].dtype == torch.float32 and got["dresidual"].dtype == torch.bfloat16
    assert_close({k: v for k, v in got.items() if k != "dresidual"}, {k: v for k, v in ref.items() if k != "dresidual"},
                 torch.float32)
    assert_close({"dresidual": got["dresidual"]}, {"dresidual": ref["dresidual"]}, torch.bfloat16)


@pytest.mark.parametrize("residual_scale", [1.0, 2.5])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_only_new_residual_has_a_gradient(kind, residual_scale):
    """The normed output unused, only s = a*r + x carried on: dx = ds, dr = a*ds, dw = db = 0."""
    g = torch.Generator().manual_seed(0)
    x, r, ds = (torch.randn(3, 5, 33, generator=g).to(DEVICE) for _ in range(3))
    w = (torch.randn(33, generator=g) + 1).to(DEVICE).requires_grad_()
    b = torch.randn(33, generator=g).to(DEVICE).requires_grad_() if kind == "layernorm" else None
    x.requires_grad_()
    r.requires_grad_()
    _, s = triton_add_norm.add_norm_triton(x, r, w, b, 1e-6, residual_scale, 0.5, kind)
    s.backward(ds)
    torch.testing.assert_close(x.grad, ds)
    torch.testing.assert_close(r.grad, residual_scale * ds)
    for p in (w, b):
        assert p is None or p.grad is None or not p.grad.any()


def test_triton_empty_input():
    x = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    y, s = triton_add_norm.add_norm_triton(x, x, w, None, 1e-6)
    y.sum().backward()
    assert y.shape == s.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16, device=DEVICE))


@pytest.mark.parametrize("case", ["pre", "deepnorm+grad", "lns-first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_torch_path_matches_reference(kind, dtype, case):
    got, ref = run_case(add_norm_torch, kind, dtype, (3, 37, 100), case)
    assert_close(got, ref, dtype)


def test_reference_check_can_fail():
    """The comparison is sensitive: a wrong eps or a wrong residual scale is caught."""
    def wrong_eps(x, r, w, b, eps, a, c, kind):
        return triton_add_norm.add_norm_triton(x, r, w, b, 1e-1, a, c, kind)

    def wrong_scale(x, r, w, b, eps, a, c, kind):
        return triton_add_norm.add_norm_triton(x, r, w, b, eps, 1.0, c, kind)

    for fn in (wrong_eps, wrong_scale):
        got, ref = run_case(fn, "rmsnorm", torch.float32, (2, 5, 33), "deepnorm+grad")
        with pytest.raises(AssertionError):
            assert_close(got, ref, torch.float32)


def test_kernels_really_run_interpreted_without_cuda():
    if DEVICE == "cuda":
        assert not triton_add_norm.interpreted()
    else:
        assert triton_add_norm.interpreted(), "conftest.py should have built the kernels for the interpreter"


def test_launch_config():
    assert launch_config(100) == (16, 128)  # small rows packed 16 per program
    assert launch_config(4096) == (1, 4096)
    assert launch_config(5000) == (1, 8192)
    with pytest.raises(ValueError, match="hidden size"):
        launch_config(65537)


def test_num_warps_is_a_function_of_the_tile():
    """~8 elements per thread, 2 to 32 warps."""
    assert num_warps(*launch_config(100)) == 8  # 16 x 128 tile
    assert num_warps(*launch_config(4096)) == 16
    assert num_warps(*launch_config(8192)) == 32
    assert num_warps(*launch_config(65536)) == 32
    assert num_warps(*launch_config(1)) == 2


def test_launch_configuration_is_not_timed():
    """No Triton autotuner (a timing-based pick of num_warps, which changes the row reductions'
    summation order): TP ranks normalising the same replicated rows in different processes must get
    bitwise-equal outputs and norm-weight gradients, or their replicated norm weights drift apart.
    Checked in a fresh process without the interpreter, where the kernels are built for a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import triton\n"
        "from megatron_mixln.kernels import add_norm_kernels as K\n"
        "tuned = [n for n, v in vars(K).items() if isinstance(v, triton.runtime.Autotuner)]\n"
        "assert not tuned, tuned\n"
        "print('OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip().endswith("OK"), out.stdout + out.stderr
