"""The Triton add+norm kernels (CPU interpreter here, compiled on a GPU) against a float64 reference:
forward and every gradient, each dtype, with/without residual, scales, bias, odd and non-contiguous."""
import pytest
import torch

pytest.importorskip("triton")

from add_norm_cases import CASES, DEVICE, assert_close, run_case  # noqa: E402
from triton_env import needs_kernels  # noqa: E402

from megatron_mixln.kernels import triton_add_norm  # noqa: E402
from megatron_mixln.kernels.add_norm import add_norm_torch  # noqa: E402
from megatron_mixln.kernels.add_norm_kernels import _warp_choices, launch_config  # noqa: E402

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
    # bf16 activations with fp32 weights (mixed precision) and an fp32 residual stream.
    got, ref = run_case(
        triton_add_norm.add_norm_triton, kind, torch.bfloat16, (4, 9, 48), "deepnorm+grad",
        w_dtype=torch.float32, r_dtype=torch.float32,
    )
    assert_close(got, ref, torch.bfloat16)


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


def test_autotune_warp_choices():
    """The GPU autotuner times only num_warps giving each thread 2-32 elements (or the closest)."""
    import triton

    configs = [triton.Config({}, num_warps=w) for w in (2, 4, 8, 16, 32)]

    def warps(block_m, block_n):
        return [c.num_warps for c in _warp_choices(configs, {}, BLOCK_M=block_m, BLOCK_N=block_n)]

    assert warps(1, 4096) == [4, 8, 16, 32]
    assert warps(1, 8192) == [8, 16, 32]
    assert warps(1, 65536) == [32]
    assert warps(16, 1) == [2]
