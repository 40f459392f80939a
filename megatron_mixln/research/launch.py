"""Run a sweep's variants: locally (one after another, or K at a time) or as one Slurm job array.

A run is *finished* when its checkpoint `latest` names the final iteration, or when it diverged (exit
code 3, or a `diverged` event in its metrics); finished runs are skipped on a rerun. A run with a
checkpoint that is not final is resumed with `--load`. Each local run leaves `status.json` (exit code,
command) and `train.log` in its run directory.

Slurm: `sbatch --array=0-(N-1)[%K] slurm/compare_norms_task.sh`; task i sources
`OUT/slurm/task_<i>.env` and runs `slurm/pretrain_7b_mixln.sh` with TRAINER_ARGS_FILE naming
`OUT/slurm/task_<i>.args`: the run's whole trainer command line, the same flags `--launcher local` runs,
so none of the 7B job's own defaults apply (the script still checks DATA/TOKENIZER, places the run in
CKPT, requeues on preemption and resumes). The array's job id goes to `OUT/slurm/job.json`; while it is still queued or running
(`squeue`), a rerun reports that and submits nothing.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

from megatron_mixln.checkpoint.layout import read_latest, tag_for
from megatron_mixln.data import parse_data_path
from megatron_mixln.errors import EXIT_DIVERGED
from megatron_mixln.research.sweep import Sweep, SweepError, Variant

DIVERGED_EXIT = EXIT_DIVERGED  # what pretrain exits with when training diverged
CONTRACT = ("NORM_POSITION", "TRAIN_ITERS", "TRAIN_DATA", "VALID_DATA", "TOKENIZER", "CKPT", "TRAINER_ARGS_FILE")


def run_state(run_dir: str, train_iters: int) -> str:
    """'finished', 'diverged', 'partial' (a checkpoint to resume from) or 'new'."""
    ckpt = os.path.join(run_dir, "ckpt")
    latest = read_latest(ckpt)
    status = _read_json(os.path.join(run_dir, "status.json"))
    if (status or {}).get("exit_code") == DIVERGED_EXIT or _has_event(run_dir, "diverged"):
        return "diverged"
    if latest == tag_for(train_iters):
        return "finished"
    return "partial" if latest else "new"


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _read_json(path: str):
    text = _read(path)
    return json.loads(text) if text else None


def _has_event(run_dir: str, event: str) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return False
    with open(path) as fh:
        return any(f'"event": "{event}"' in line for line in fh)


def local_command(sweep: Sweep, v: Variant, python: str = sys.executable, nproc: int = 1) -> list[str]:
    args = sweep.pretrain_args(v)
    ckpt = os.path.join(sweep.run_dir(v), "ckpt")
    if read_latest(ckpt):
        args += ["--load", ckpt]
    if nproc > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "megatron_mixln.pretrain", *args]
    return [python, "-m", "megatron_mixln.pretrain", *args]


def run_local(sweep: Sweep, todo: list[Variant], parallel: int = 1, nproc: int = 1, repo: str | None = None,
              log=print) -> dict[str, int]:
    """Run `todo`, `parallel` at a time (`repo` first on the children's PYTHONPATH). -> {variant name: exit code}."""
    pending, running, codes = list(todo), {}, {}
    env = dict(os.environ)
    if repo:
        env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    while pending or running:
        while pending and len(running) < parallel:
            v = pending.pop(0)
            run_dir = sweep.run_dir(v)
            os.makedirs(run_dir, exist_ok=True)
            cmd = local_command(sweep, v, nproc=nproc)
            log(f"[compare_norms] start {v.name}{' (resuming)' if '--load' in cmd else ''}: {shlex.join(cmd)}")
            logf = open(os.path.join(run_dir, "train.log"), "a")
            running[v.name] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env), logf, cmd, time.time())
        for name, (proc, logf, cmd, t0) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            logf.close()
            del running[name]
            codes[name] = rc
            from megatron_mixln.fileio import atomic_write_json

            run_dir = os.path.join(sweep.out, "runs", name)
            atomic_write_json(os.path.join(run_dir, "status.json"),
                              {"exit_code": rc, "seconds": round(time.time() - t0, 1), "command": cmd})
            what = {0: "done", DIVERGED_EXIT: "diverged"}.get(rc, f"FAILED (exit {rc}, see {run_dir}/train.log)")
            log(f"[compare_norms] {name}: {what} after {time.time() - t0:.0f} s")
        if running:
            time.sleep(0.2)
    return codes


# --- Slurm ------------------------------------------------------------------------------------

def _pop_flag(args: list[str], flag: str, nargs_multi: bool = False) -> tuple[list[str] | None, list[str]]:
    """Remove `flag VALUE` (or `flag V1 V2 ...` up to the next flag) from args."""
    if flag not in args:
        return None, args
    i = args.index(flag)
    j = i + 1
    while j < len(args) and (nargs_multi or j == i + 1) and not args[j].startswith("--"):
        j += 1
    return args[i + 1:j], args[:i] + args[j:]


def slurm_env(sweep: Sweep, v: Variant, args_file: str, train_iters: int) -> dict[str, str]:
    """The environment of slurm/pretrain_7b_mixln.sh for one run: TRAINER_ARGS_FILE names the run's whole
    command line (the same flags --launcher local runs, one per line), so none of the 7B job's own defaults
    apply; DATA/TOKENIZER (checked by the script before any launch), CKPT, NORM_POSITION and TRAIN_ITERS
    (the script's "finished" test) are set from the same flags."""
    args = sweep.pretrain_args(v)
    env = {k: "" for k in CONTRACT}
    tokenizer, _ = _pop_flag(args, "--tokenizer")
    env["TOKENIZER"] = tokenizer[0] if tokenizer else ""
    data, _ = _pop_flag(args, "--data-path", nargs_multi=True)
    valid, _ = _pop_flag(args, "--valid-data-path", nargs_multi=True)
    prefixes = parse_data_path(data)[0] if data else []  # the script checks the first prefix of each
    valid_prefixes = parse_data_path(valid)[0] if valid else prefixes
    env["TRAIN_DATA"] = prefixes[0] if prefixes else ""
    env["VALID_DATA"] = valid_prefixes[0] if valid_prefixes else ""
    env["NORM_POSITION"] = v.flags()[1]  # the --norm-position value (a zoo variant names its recipe)
    env["TRAIN_ITERS"] = str(train_iters)
    env["CKPT"] = os.path.join(sweep.run_dir(v), "ckpt")
    env["TRAINER_ARGS_FILE"] = args_file
    return env


def write_slurm_tasks(sweep: Sweep, todo: list[Variant]) -> str:
    """OUT/slurm/task_<i>.env for each run, and tasks.json naming them. Returns the directory."""
    from megatron_mixln.fileio import atomic_write_json, atomic_write_text

    d = os.path.join(sweep.out, "slurm")
    os.makedirs(d, exist_ok=True)
    from megatron_mixln.training.arguments import parse_configs

    for i, v in enumerate(todo):
        os.makedirs(sweep.run_dir(v), exist_ok=True)
        args = sweep.pretrain_args(v)
        if any("\n" in a for a in args):
            raise SweepError(f"--launcher slurm: a pretraining argument holds a newline: {args!r}")
        args_file = os.path.join(d, f"task_{i}.args")
        atomic_write_text(args_file, "\n".join(args) + "\n")
        train_iters = parse_configs(args)[1].train_iters
        lines = [f"export {k}={shlex.quote(val)}" for k, val in slurm_env(sweep, v, args_file, train_iters).items()]
        atomic_write_text(os.path.join(d, f"task_{i}.env"), "\n".join([f"# {v.name}", *lines]) + "\n")
    atomic_write_json(os.path.join(d, "tasks.json"), [v.name for v in todo])
    return d


def sbatch_command(sweep: Sweep, n_tasks: int, parallel: int | None, sbatch_args: list[str], repo: str) -> list[str]:
    array = f"0-{n_tasks - 1}" + (f"%{parallel}" if parallel else "")
    return ["sbatch", "--parsable", f"--array={array}", "--job-name=mixln-compare",
            f"--output={os.path.join(sweep.out, 'slurm', 'task_%a-%A.out')}",
            f"--export=ALL,MIXLN_TASK_DIR={os.path.join(sweep.out, 'slurm')},ROOT={repo}",
            *sbatch_args, os.path.join(repo, "slurm", "compare_norms_task.sh")]


def slurm_job_active(out: str) -> str | None:
    """The recorded array job id when `squeue` still lists it, else None."""
    job = _read_json(os.path.join(out, "slurm", "job.json"))
    if not job:
        return None
    try:
        listed = subprocess.run(["squeue", "-h", "-j", str(job["job_id"]), "-o", "%i"], capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return str(job["job_id"]) if listed.returncode == 0 and listed.stdout.strip() else None


def submit_slurm(sweep: Sweep, todo: list[Variant], parallel: int | None, sbatch_args: list[str], repo: str,
                 log=print) -> str:
    from megatron_mixln.fileio import atomic_write_json

    write_slurm_tasks(sweep, todo)
    cmd = sbatch_command(sweep, len(todo), parallel, sbatch_args, repo)
    log(f"[compare_norms] submitting: {shlex.join(cmd)}")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise SweepError(f"--launcher slurm: cannot run sbatch: {exc}") from None
    if res.returncode != 0:
        raise SweepError(f"--launcher slurm: sbatch failed (exit {res.returncode}): {res.stderr.strip()}")
    job_id = res.stdout.strip().split(";")[0]
    atomic_write_json(os.path.join(sweep.out, "slurm", "job.json"),
                      {"job_id": job_id, "command": cmd, "tasks": [v.name for v in todo]})
    return job_id
