"""--hang-timeout: one rank of a 2-process run sleeps inside a step; both ranks dump their Python
stacks (faulthandler) to their log and exit 124, and nothing waits for the allocation to run out."""
import os
import sys
import tempfile
import time

import pytest
import torch.multiprocessing as mp

from training_testlib import LOOPBACK_ENV, tiny_datasets, tiny_model, tiny_train

from megatron_mixln.training.watchdog import DEFAULT_GPU_TIMEOUT_S, HANG_EXIT_CODE, resolve_hang_timeout

TIMEOUT_S = 3


def _worker(rank, world_size, tmpdir):
    log = open(os.path.join(tmpdir, f"rank{rank}.log"), "w")
    os.dup2(log.fileno(), 2)  # this rank's stderr: where a launcher's per-rank log would be
    os.environ.update(LOOPBACK_ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world_size)
    from megatron_mixln.training import trainer
    from megatron_mixln.training.loss import token_losses

    calls = []

    def sleepy_loss(logits, labels):  # one micro-batch per rank and step: call 2 is inside step 2
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            time.sleep(600)
        return token_losses(logits, labels)

    trainer.make_token_loss_fn = lambda state=None: sleepy_loss
    trainer.pretrain(tiny_model(), tiny_train(hang_timeout=TIMEOUT_S, train_iters=4, eval_iters=0), tiny_datasets())
    sys.exit(0)  # not reached: the watchdog ends the process


@pytest.mark.slow
def test_one_sleeping_rank_makes_every_rank_dump_stacks_and_exit():
    os.environ.update(LOOPBACK_ENV)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmpdir:
        procs = [ctx.Process(target=_worker, args=(r, 2, tmpdir)) for r in range(2)]
        for p in procs:
            p.start()
        deadline = time.time() + 240
        for p in procs:
            p.join(max(1, deadline - time.time()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        logs = [open(os.path.join(tmpdir, f"rank{r}.log")).read() for r in range(2)]
        assert not alive, logs
        assert [p.exitcode for p in procs] == [HANG_EXIT_CODE] * 2, logs
    for rank, log in enumerate(logs):
        assert f"[rank {rank}] hang watchdog: no progress for" in log and "in step 2 (--hang-timeout 3, allowed 3 s here)" in log, log
        assert "most recent call first" in log and "in train_step" in log, log  # faulthandler's stack dump
    assert "in sleepy_loss" in logs[1]  # the culprit is visible in its stack


def test_default_timeout_is_generous_on_gpu_and_off_on_cpu():
    assert resolve_hang_timeout(None, on_gpu=True) == DEFAULT_GPU_TIMEOUT_S >= 1800
    assert resolve_hang_timeout(None, on_gpu=False) == 0
    assert resolve_hang_timeout(60, on_gpu=False) == 60 and resolve_hang_timeout(0, on_gpu=True) == 0
