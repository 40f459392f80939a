import sys
from pathlib import Path

# Helpers shared by all test directories (spawn_testlib) and, in spawned workers, importable by name.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def single_rank():
    """A 1-rank process group (file store, gloo on loopback) for in-process training runs."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from megatron_mixln.training.distributed import init_distributed, shutdown_distributed

    init_distributed()
    yield
    shutdown_distributed()
