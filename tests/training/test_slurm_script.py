"""slurm/pretrain_7b_mixln.sh under fake `srun`, `scontrol` and python: the USR1 that Slurm sends
before the time limit reaches the trainers (and only them), they save and exit 0, and the job
requeues itself; a requeued job resumes with --load, and a finished one is not requeued.

Everything runs locally in a new session; the fake `pkill` only sees that session, so no other
process of this user is ever signalled."""
import os
import shutil
import signal
import subprocess
import time

import pytest

from training_testlib import REPO

SCRIPT = os.path.join(REPO, "slurm", "pretrain_7b_mixln.sh")

FAKE_PYTHON = r"""#!/bin/bash
# The venv's python, as far as the Slurm script uses it.
case " $* " in
*" -m deepspeed.launcher.runner "*)
    # DeepSpeed's launcher: starts the trainer and waits; like the real one, no USR1 handler.
    "$0" -u -m megatron_mixln.pretrain --local_rank=0 &
    wait $!
    exit $? ;;
*" -m megatron_mixln.pretrain "*)
    echo "$*" >> "$FAKE_LOG/trainer_args"
    trap 'echo iter_0000005 > "$CKPT/latest"; echo saved >> "$FAKE_LOG/events"; exit 0' USR1
    sleep 0.2
    touch "$FAKE_LOG/started"
    while :; do sleep 0.05; done ;;
esac
exit 99
"""

FAKE_SRUN = r"""#!/bin/bash
# Runs the command locally (options dropped) and forwards USR1 to it, as srun does to its tasks.
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
"$@" &
child=$!
trap 'kill -USR1 $child 2>/dev/null' USR1
while :; do
    wait $child
    rc=$?
    kill -0 $child 2>/dev/null || exit $rc
done
"""

FAKE_SCONTROL = r"""#!/bin/bash
case "$1" in
show) echo localhost ;;
requeue) echo "requeue $2" >> "$FAKE_LOG/scontrol" ;;
esac
"""


def _write(path, text):
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o755)


@pytest.fixture
def fake_cluster(tmp_path):
    pkill = shutil.which("pkill")
    if pkill is None:
        pytest.skip("needs pkill")
    fakebin, venv_bin, log = tmp_path / "bin", tmp_path / "venv" / "bin", tmp_path / "log"
    for d in (fakebin, venv_bin, log, tmp_path / "root"):
        d.mkdir(parents=True)
    _write(venv_bin / "python", FAKE_PYTHON)
    _write(fakebin / "srun", FAKE_SRUN)
    _write(fakebin / "scontrol", FAKE_SCONTROL)
    _write(fakebin / "pkill", f'#!/bin/bash\nexec {pkill} -s 0 "$@"\n')  # this session only
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "SRUN_"))}
    env.update(PATH=f"{fakebin}{os.pathsep}{env.get('PATH', '')}", ROOT=str(tmp_path / "root"),
               VENV=str(tmp_path / "venv"), CKPT=str(tmp_path / "ckpt"), FAKE_LOG=str(log),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="1")
    return env, tmp_path


def _run_until_usr1(env):
    """Start the batch script, send it USR1 once the trainer runs, return (exit code, output)."""
    started = os.path.join(env["FAKE_LOG"], "started")
    if os.path.exists(started):
        os.unlink(started)
    proc = subprocess.Popen(["bash", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 30
        while not os.path.exists(started):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the trainer did not start"
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


def _read(path):
    return open(path).read().splitlines() if os.path.exists(path) else []


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_usr1_saves_then_requeues(fake_cluster, launcher):
    env, tmp = fake_cluster
    env.update(LAUNCHER=launcher, TRAIN_ITERS="100")
    rc, out = _run_until_usr1(env)
    assert rc == 0, out
    assert _read(tmp / "log" / "events") == ["saved"], out  # the trainer got USR1 and saved
    assert _read(tmp / "ckpt" / "latest") == ["iter_0000005"]
    assert "not finished: requeueing job 4242 to resume from iter_0000005" in out
    assert _read(tmp / "log" / "scontrol") == ["requeue 4242"]
    assert "--load" not in _read(tmp / "log" / "trainer_args")[0]  # nothing to resume from yet


def test_requeued_job_resumes_and_a_finished_one_stops(fake_cluster):
    env, tmp = fake_cluster
    os.makedirs(tmp / "ckpt")
    (tmp / "ckpt" / "latest").write_text("iter_0000003")
    env.update(LAUNCHER="srun", TRAIN_ITERS="5")  # the fake trainer saves iter_0000005: the last step
    rc, out = _run_until_usr1(env)
    assert rc == 0, out
    assert f"--load {tmp / 'ckpt'}" in _read(tmp / "log" / "trainer_args")[0]
    assert "resume: iter_0000003" in out and "requeueing" not in out
    assert _read(tmp / "log" / "scontrol") == []
