"""Test-only (tests/slurm/test_hang_requeue.py puts this folder on the job's PYTHONPATH): in the first run
of a job (SLURM_RESTART_COUNT unset or 0), Slurm task 1 blocks forever in its first all_reduce once the
checkpoint directory HANG_TEST_CKPT's `latest` names HANG_TEST_AFTER -- a hung collective, as a dead
NCCL peer or a stuck filesystem would leave it. Python starts every trainer with this module."""
import os

if (os.environ.get("HANG_TEST_CKPT") and os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
        and os.environ.get("SLURM_PROCID") == "1"):
    import time

    import torch.distributed as dist

    _all_reduce = dist.all_reduce

    def _hanging_all_reduce(*args, **kwargs):
        try:
            with open(os.path.join(os.environ["HANG_TEST_CKPT"], "latest")) as fh:
                latest = fh.read().strip()
        except OSError:
            latest = ""
        if latest == os.environ.get("HANG_TEST_AFTER"):
            time.sleep(3600)
        return _all_reduce(*args, **kwargs)

    dist.all_reduce = _hanging_all_reduce
