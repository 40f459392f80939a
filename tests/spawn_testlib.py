"""Run a function on N local processes (gloo over loopback only) and collect what each rank returns.

Shared by every test directory (tests/conftest.py puts this folder on sys.path). The rendezvous is
a `file://` in a temporary directory (no TCP store) and gloo's connections are pinned to `lo` by
GLOO_SOCKET_IFNAME, so nothing listens on or talks to a non-loopback address.

The ranks are forked from a forkserver that imported torch and DeepSpeed once (`PRELOAD`), not
started as fresh interpreters that each import them again (seconds per rank, every job of the
suite); each rank starts from the caller's environment of the moment (`os.environ`, passed along),
as a spawned one would.
"""
from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
                "WANDB_MODE": "disabled"}


PRELOAD = ["torch", "torch.distributed", "deepspeed"]  # what every job imports: once, in the forkserver


def _worker(rank, world_size, tmpdir, fn, args, environ):
    os.environ.clear()
    os.environ.update(environ)  # the caller's, not the forkserver's of its start
    os.environ.update(LOOPBACK_ENV)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, tmpdir, *args)
        torch.save(result, os.path.join(tmpdir, f"result_{rank}.pt"))
    except BaseException:
        with open(os.path.join(tmpdir, f"error_{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_spawned(fn, world_size: int, *args) -> list:
    """fn(rank, world_size, tmpdir, *args) on `world_size` processes; returns the per-rank results
    (loaded with weights_only=True: return dicts/lists of tensors, numbers and strings)."""
    os.environ.update(LOOPBACK_ENV)
    with tempfile.TemporaryDirectory() as tmpdir:
        try:
            mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
            mp.start_processes(_worker, args=(world_size, tmpdir, fn, args, dict(os.environ)), nprocs=world_size,
                               join=True, start_method="forkserver")
        except Exception as exc:
            errors = [open(os.path.join(tmpdir, f)).read() for f in sorted(os.listdir(tmpdir)) if f.startswith("error_")]
            raise RuntimeError("distributed job failed:\n" + "\n".join(errors)) from exc
        return [torch.load(os.path.join(tmpdir, f"result_{r}.pt"), weights_only=True) for r in range(world_size)]
