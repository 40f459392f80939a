"""A hang under Slurm: the unmodified slurm/pretrain_7b_mixln.sh on 2 nodes of a real cluster, where
rank 1 blocks in a collective after the step-8 checkpoint (tests/slurm/hang_hook). Both ranks' hang
watchdogs (--hang-timeout) dump stacks and exit 124; the job body requeues the job (bounded by
MAX_HANG_REQUEUES, named in the log), which resumes from iter_0000008 and finishes on the curve of an
uninterrupted run. With MAX_HANG_REQUEUES=0 the job fails with one line saying why."""
import os

from slurm_testlib import TINY_SHAPE, job_env, job_output, train_losses, two_node_options

import pytest

SCRIPT = "slurm/pretrain_7b_mixln.sh"
HOOK = os.path.join(os.path.dirname(__file__), "hang_hook")


def _submit(cluster, data, root, name, hang: bool, **env):
    ckpt = os.path.join(root, name)
    extra = {}
    if hang:
        extra = dict(PYTHONPATH=f"{HOOK}:{os.environ.get('PYTHONPATH', '')}", HANG_TEST_CKPT=ckpt,
                     HANG_TEST_AFTER="iter_0000008", EXTRA_ARGS=f"{TINY_SHAPE} --hang-timeout 5")
    job = cluster.sbatch(SCRIPT, *two_node_options(root, name), env=job_env(data, ckpt, **extra, **env))
    return job, ckpt


def test_a_hang_is_requeued_and_resumed(slurm_cluster, tiny_data, tmp_path):
    root = str(tmp_path)
    ref_job, ref_ckpt = _submit(slurm_cluster, tiny_data, root, "reference", hang=False)
    job, ckpt = _submit(slurm_cluster, tiny_data, root, "hang", hang=True)
    capped_job, capped_ckpt = _submit(slurm_cluster, tiny_data, root, "capped", hang=True, MAX_HANG_REQUEUES=0)

    info = slurm_cluster.wait(job, timeout=420)
    out = job_output(root, "hang", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out)
    assert "hang watchdog: no progress for" in out, out  # the stacks of the first run
    assert ("requeueing job" in out and "the trainers hung (exit 124, stacks above): hang requeue 1 of "
            "MAX_HANG_REQUEUES=3" in out), out
    assert f"resumed from {ckpt} (iter_0000008)" in out, out
    assert open(os.path.join(ckpt, "latest")).read().strip() == "iter_0000016"

    capped = slurm_cluster.wait(capped_job, timeout=420)
    capped_out = job_output(root, "capped", capped_job)
    assert capped["JobState"] == "FAILED" and capped["Restarts"] == "0", (capped, capped_out)
    assert ("error: the trainers hung (exit 124, stacks above) after 0 hang requeues (MAX_HANG_REQUEUES=0)"
            in capped_out), capped_out
    assert open(os.path.join(capped_ckpt, "latest")).read().strip() == "iter_0000008"

    ref = slurm_cluster.wait(ref_job, timeout=420)
    assert ref["JobState"] == "COMPLETED", job_output(root, "reference", ref_job)
    assert train_losses(ckpt) == pytest.approx(train_losses(ref_ckpt), rel=1e-6, abs=0)
