"""Whether the Triton kernels can run in this test process (on a GPU, or interpreted on CPU)."""
import pytest
import torch


def kernels_runnable_here() -> bool:
    try:
        import triton.language.standard as triton_std
        from triton.runtime.interpreter import InterpretedFunction

        from megatron_mixln.kernels import triton_add_norm
    except ImportError:
        return False
    if torch.cuda.is_available():
        return True
    # Both triton's library (built when triton was imported) and our kernels must be interpreted.
    return isinstance(triton_std._sum_combine, InterpretedFunction) and triton_add_norm.interpreted()


RUNNABLE = kernels_runnable_here()
needs_kernels = pytest.mark.skipif(
    not RUNNABLE,
    reason="no triton, or triton was imported before TRITON_INTERPRET=1 could be set "
    "(test_add_norm_subprocess.py then runs these tests in a fresh process)",
)
