"""A real Slurm for the tests: slurm/local_cluster.sh's private cluster, and helpers to submit the
job scripts to it and watch their jobs (uniquely named: test directories share sys.path).

Every command runs inside the cluster's loopback-only network namespace (`local_cluster.sh run`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLUSTER_SCRIPT = os.path.join(REPO, "slurm", "local_cluster.sh")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
TINY_SHAPE = "--vocab-size 256 --hidden-size 64 --ffn-hidden-size 128 --num-layers 2 --num-attention-heads 2"


def why_no_cluster() -> str | None:
    """None when a private Slurm can run here, else the reason (the tests skip with it)."""
    if os.geteuid() != 0:
        return "needs root (network namespace, Slurm daemons)"
    for prog in ("slurmctld", "slurmd", "munged", "sbatch", "srun", "unshare", "nsenter", "ip"):
        if shutil.which(prog) is None:
            return f"{prog} not found: run tests/run.sh as root (it installs slurm-wlm and munge) or apt-get install -y slurm-wlm munge"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        return "unshare -n is not permitted here (no network namespaces)"
    return None


class Cluster:
    """A running local_cluster.sh cluster in `path` (config, logs and state)."""

    def __init__(self, path: str):
        self.path = path

    def run(self, *cmd, env=None, check=True, timeout=60) -> subprocess.CompletedProcess:
        proc = subprocess.run([CLUSTER_SCRIPT, "run", self.path, *cmd], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, script: str, *options: str, env: dict) -> str:
        """Submit `script` (a path relative to the repository) unmodified; returns the job id."""
        out = self.run("sbatch", "--parsable", *options, script, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, timeout: float, states=TERMINAL, poll: float = 0.5) -> dict:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s: {info}")
            time.sleep(poll)

    def steps(self, job_id: str) -> list[str]:
        return self.run("squeue", "-h", "-s", "-j", job_id, "-o", "%i", check=False).stdout.split()


def start_cluster(path: str, nodes: int = 4) -> Cluster:
    """Nodes claim 96 CPUs and 8 (stand-in) GPUs each, so the paper's job scripts fit as written."""
    env = dict(os.environ, NODES=str(nodes), CPUS="96", GPUS="8")
    proc = subprocess.run([CLUSTER_SCRIPT, "start", path], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"local_cluster.sh start failed: {proc.stdout}{proc.stderr}")
    return Cluster(path)


def stop_cluster(cluster: Cluster) -> None:
    subprocess.run([CLUSTER_SCRIPT, "stop", cluster.path], capture_output=True, timeout=120)


def job_env(data_prefix: str, ckpt: str, **overrides) -> dict:
    """The environment a user would set before `sbatch slurm/pretrain_7b_mixln.sh`, for a tiny CPU run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "SRUN_", "SBATCH_"))}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    env.update(
        VENV=sys.prefix, PYTHONPATH=REPO, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", WANDB_MODE="disabled",
        PRESET="9m", NORM_POSITION="mix", POST_LN_LAYERS="1", SEQ_LENGTH="32", MICRO_BATCH="2", GLOBAL_BATCH="4",
        TRAIN_ITERS="16", WARMUP_ITERS="2", LR="1e-2", BF16="0", RECOMPUTE="0", DS_CONFIG="ds_configs/zero1.json",
        EVAL_ITERS="1", EVAL_INTERVAL="8", LOG_INTERVAL="1", SAVE_INTERVAL="4", KEEP_LAST="10",
        GRAD_NORM_INTERVAL="0", DATA=data_prefix, TOKENIZER="null:255", CKPT=ckpt, EXTRA_ARGS=TINY_SHAPE,
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def two_node_options(out_dir: str, name: str, nodes: int = 2) -> list[str]:
    """sbatch options that shrink the 7B script's placement to CPU tasks: one per node."""
    return [f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10",
            f"--job-name={name}", f"--output={out_dir}/{name}-%j.out"]


def job_output(out_dir: str, name: str, job_id: str) -> str:
    path = os.path.join(out_dir, f"{name}-{job_id}.out")
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def train_losses(run_dir: str) -> dict[int, float]:
    """step -> loss of metrics.jsonl's train lines (a later line for the same step wins: a resumed run).
    Read while a job may be appending: a last line without its newline is not complete yet."""
    losses = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            if line.startswith("{") and line.endswith("\n"):
                rec = json.loads(line)
                if rec.get("kind") == "train":
                    losses[rec["step"]] = rec["loss"]
    return losses


def latest_iteration(ckpt: str) -> int:
    try:
        return int(open(os.path.join(ckpt, "latest")).read().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return 0


def trainer_pids(job_id: str) -> dict[int, int]:
    """rank -> PID of this job's `-m megatron_mixln.pretrain` processes (found by their environment)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            if b"megatron_mixln.pretrain" not in cmdline or b"-m" not in cmdline:
                continue
            env = dict(kv.split(b"=", 1) for kv in open(f"/proc/{entry}/environ", "rb").read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode():
            rank = env.get(b"RANK", env.get(b"SLURM_PROCID"))
            found[int(rank)] = int(entry)
    return found
