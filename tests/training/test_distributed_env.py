"""init_distributed without a launcher sets variables for its 1-rank group; shutdown removes them again, so
processes a test (or a notebook) starts later do not inherit them (GLOO_SOCKET_IFNAME=lo made two-"node"
launches abort at exit)."""
import os

import pytest
import torch.distributed as dist


def test_shutdown_removes_what_init_set(monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group of another test is alive in this process")
    for name in ("GLOO_SOCKET_IFNAME", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    from megatron_mixln.training.distributed import init_distributed, shutdown_distributed

    init_distributed()
    try:
        assert os.environ["GLOO_SOCKET_IFNAME"] == "lo" and dist.get_world_size() == 1
    finally:
        shutdown_distributed()
    assert "GLOO_SOCKET_IFNAME" not in os.environ and "LOCAL_RANK" not in os.environ
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # a setting of the user's own is kept
    init_distributed()
    shutdown_distributed()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
