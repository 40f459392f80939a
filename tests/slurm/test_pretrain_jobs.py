"""The unmodified slurm/pretrain_7b_mixln.sh, submitted with sbatch (options and environment only),
trains a tiny model on CPU across 2 Slurm nodes of a real cluster:

- srun: the uninterrupted reference run (checkpoints, metrics, 2 nodes, master = first NodeAddr);
- DeepSpeed's launcher (`--no_ssh`, one per node): SIGUSR1 while the trainers are still starting
  -> they save after the first step that saw it (their first, when it came before), the job requeues
  itself and resumes; losses equal the reference;
- srun, SIGUSR1 mid-run -> save, requeue, resume; the loss curve equals the reference's;
- one task killed -> the job fails within seconds; a resubmission resumes from the last checkpoint
  and ends on the reference's curve;
- an array job over norm positions from the one script.
The runs are submitted together (4 nodes, two 2-node jobs at a time) and checked one per test.
"""
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from slurm_testlib import (
    job_env, job_output, latest_iteration, train_losses, trainer_pids, two_node_options,
)

SCRIPT = "slurm/pretrain_7b_mixln.sh"
ITERS, SAVE_EVERY = 32, 8


class Runs:
    """The module's jobs: submitted at once, each awaited by the test that checks it."""

    def __init__(self, cluster, data, root):
        self.cluster, self.data, self.root = cluster, data, str(root)
        self.jobs = {}

    def ckpt(self, name):
        return os.path.join(self.root, name)

    def submit(self, name, *extra_options, **env):
        env = job_env(self.data, self.ckpt(name), TRAIN_ITERS=ITERS, SAVE_INTERVAL=SAVE_EVERY, EVAL_INTERVAL=16, **env)
        self.jobs[name] = self.cluster.sbatch(SCRIPT, *two_node_options(self.root, name), *extra_options, env=env)
        return self.jobs[name]

    def output(self, name, job=None):
        return job_output(self.root, name, job or self.jobs[name])

    def wait_done(self, name, timeout=240):
        info = self.cluster.wait(self.jobs[name], timeout)
        assert info["JobState"] == "COMPLETED", (info, self.output(name))
        return info


def _preempt(cluster, job):
    cluster.run("scancel", "--signal=USR1", "--batch", job)


def _until(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, what()
        time.sleep(0.1)


def _signal_while_starting(runs):
    """USR1 as soon as the launch step exists, i.e. while DeepSpeed's launchers start the trainers."""
    job = runs.jobs["deepspeed"]
    _until(lambda: f"{job}.0" in runs.cluster.steps(job), 180, lambda: runs.output("deepspeed"))
    _preempt(runs.cluster, job)


def _signal_mid_run(runs):
    ckpt = runs.ckpt("preempt")
    _until(lambda: os.path.exists(os.path.join(ckpt, "metrics.jsonl")) and max(train_losses(ckpt), default=0) >= 2,
           240, lambda: runs.output("preempt"))
    _preempt(runs.cluster, runs.jobs["preempt"])


def _kill_one_task_then_resubmit(runs):
    """Kill rank 1 once a checkpoint exists; record how the job ended; submit the same job again."""
    job, ckpt = runs.jobs["kill"], runs.ckpt("kill")
    _until(lambda: latest_iteration(ckpt) >= SAVE_EVERY, 240, lambda: runs.output("kill"))
    pids = trainer_pids(job)
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.time()
    info = runs.cluster.wait(job, timeout=120, poll=0.2)
    facts = {"pids": sorted(pids), "info": info, "seconds": time.time() - killed_at,
             "output": runs.output("kill", job), "last_good": latest_iteration(ckpt)}
    facts["resubmitted"] = runs.submit("kill")  # the same command again
    return facts


@pytest.fixture(scope="module")
def runs(slurm_cluster, tiny_data, tmp_path_factory):
    """Submits the jobs at once; a thread per job acts on it (signal, kill) at the right moment."""
    r = Runs(slurm_cluster, tiny_data, tmp_path_factory.mktemp("slurm_jobs"))
    r.submit("reference")
    r.submit("deepspeed", LAUNCHER="deepspeed")
    r.submit("preempt")
    r.submit("kill")
    with ThreadPoolExecutor(3) as pool:
        r.drivers = {"deepspeed": pool.submit(_signal_while_starting, r), "preempt": pool.submit(_signal_mid_run, r),
                     "kill": pool.submit(_kill_one_task_then_resubmit, r)}
        yield r


def test_srun_two_nodes(runs):
    info = runs.wait_done("reference")
    out, ckpt = runs.output("reference"), runs.ckpt("reference")
    assert info["NumNodes"] == "2", info
    # MASTER_ADDR is the first node's NodeAddr (127.0.0.N+1 for node nN), not its name
    first = int(info["NodeList"][len("n["):].split("-")[0].split(",")[0])
    assert f"master 127.0.0.{first + 1}:" in out, out
    assert open(os.path.join(ckpt, "latest")).read().strip() == f"iter_{ITERS:07d}"
    assert sorted(d for d in os.listdir(ckpt) if d.startswith("iter_")) == [f"iter_{i:07d}" for i in (8, 16, 24, 32)]
    config = json.load(open(os.path.join(ckpt, "config.json")))
    assert config["world_size"] == 2 and config["positions"] == "post,pre"
    losses = train_losses(ckpt)
    assert sorted(losses) == list(range(1, ITERS + 1))
    assert all(3.0 < v < 7.0 for v in losses.values())  # ~ln(256) = 5.55 for random tokens
    valid = [json.loads(ln) for ln in open(os.path.join(ckpt, "metrics.jsonl")) if '"valid"' in ln]
    assert [v["step"] for v in valid] == [16, 32]
    assert "requeueing" not in out and info["Restarts"] == "0"


def test_deepspeed_launcher_preempted_while_starting(runs):
    runs.drivers["deepspeed"].result()
    info = runs.wait_done("deepspeed", timeout=300)
    out = runs.output("deepspeed")
    assert "SIGUSR1 forwarded to" in out, out
    # Whichever node's trainer the signal reached (and whether before or after its first step), rank 0
    # names it and every rank stops after the same step: the one the requeued job resumes from.
    stopped = [ln for ln in out.splitlines() if ln.startswith("preemption signal (SIGUSR1) at iteration")]
    assert len(stopped) == 1, out
    at = int(stopped[0].split("iteration ")[1].split(":")[0])
    assert "requeueing job" in out and info["Restarts"] == "1", out
    assert 1 <= at < ITERS and f"resumed from {runs.ckpt('deepspeed')} (iter_{at:07d})" in out, out
    ckpt = runs.ckpt("deepspeed")
    assert open(os.path.join(ckpt, "latest")).read().strip() == f"iter_{ITERS:07d}"
    assert json.load(open(os.path.join(ckpt, "config.json")))["world_size"] == 2
    runs.wait_done("reference")
    reference = train_losses(runs.ckpt("reference"))
    assert train_losses(runs.ckpt("deepspeed")) == pytest.approx(reference, rel=1e-6, abs=0)


def test_preempt_mid_run_requeues_and_resumes_on_the_same_curve(runs):
    runs.drivers["preempt"].result()
    ckpt = runs.ckpt("preempt")
    info = runs.wait_done("preempt", timeout=300)
    out = runs.output("preempt")
    assert info["Restarts"] == "1", out
    stopped = [ln for ln in out.splitlines() if ln.startswith("preemption signal (SIGUSR1) at iteration")]
    assert len(stopped) == 1, out
    at = int(stopped[0].split("iteration ")[1].split(":")[0])
    assert 2 <= at < ITERS, out  # it stopped mid-run
    assert f"resumed from {ckpt} (iter_{at:07d})" in out, out
    runs.wait_done("reference")
    assert train_losses(ckpt) == pytest.approx(train_losses(runs.ckpt("reference")), rel=1e-6, abs=0)


def test_killed_task_fails_fast_and_resubmission_resumes(runs):
    facts = runs.drivers["kill"].result()
    ckpt = runs.ckpt("kill")
    assert facts["pids"] == [0, 1]
    assert facts["info"]["JobState"] == "FAILED", facts
    assert facts["seconds"] < 30, facts  # no hang in a collective
    assert "error: the trainers failed" in facts["output"]
    last_good = facts["last_good"]
    assert SAVE_EVERY <= last_good < ITERS, facts
    runs.wait_done("kill")
    out = runs.output("kill", facts["resubmitted"])
    assert f"resume: iter_{last_good:07d}" in out and f"resumed from {ckpt} (iter_{last_good:07d})" in out, out
    runs.wait_done("reference")
    assert train_losses(ckpt) == pytest.approx(train_losses(runs.ckpt("reference")), rel=1e-6, abs=0)


def test_array_job_over_norm_positions(runs, slurm_cluster):
    positions = {"pre": "pre*2", "post": "post*2", "mix": "post,pre"}
    env = job_env(runs.data, runs.ckpt("sweep"), NORM_POSITIONS=",".join(positions), TRAIN_ITERS=4, SAVE_INTERVAL=4,
                  EVAL_INTERVAL=4)
    array = slurm_cluster.sbatch(SCRIPT, "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
                                 "--time=10", "--array=0-2", f"--output={runs.root}/sweep-%A_%a.out", env=env)
    for i, (pos, resolved) in enumerate(positions.items()):
        info = slurm_cluster.wait(f"{array}_{i}", timeout=240)
        out = job_output(runs.root, "sweep", f"{array}_{i}")
        assert info["JobState"] == "COMPLETED", out
        run = os.path.join(runs.ckpt("sweep"), pos)
        config = json.load(open(os.path.join(run, "config.json")))
        assert config["positions"] == resolved and config["world_size"] == 1
        assert open(os.path.join(run, "latest")).read().strip() == "iter_0000004"
        assert sorted(train_losses(run)) == [1, 2, 3, 4]
