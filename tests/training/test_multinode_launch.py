"""Multi-node without Slurm: two "nodes" on loopback addresses (127.0.0.1 and 127.0.0.2) inside one
private network namespace, started by `torchrun --nnodes 2` (c10d rendezvous) and by DeepSpeed's
launcher with a hostfile (--no_ssh, one launcher per node with its --node_rank). Each gives the same
losses as one node with the same world size (2 processes)."""
import json
import os
import shlex
import shutil
import subprocess

import pytest

from training_testlib import PYTHON, REPO, entry_env, tiny_cli_args, write_token_dataset

PORT = 29531  # inside a private namespace: nothing else listens there


def _netns_ok():
    return shutil.which("unshare") and subprocess.run(
        ["unshare", "-n", "bash", "-c", "ip link set lo up && ip addr add 127.0.0.2/8 dev lo"],
        capture_output=True).returncode == 0


pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not _netns_ok(), reason="needs `unshare -n` (root) for a private loopback-only network with two addresses")]


def _in_namespace(commands: list[str], tmp_path, timeout=420):
    """Run commands concurrently in one new network namespace whose lo has 127.0.0.1 and 127.0.0.2."""
    body = ["set -e", "ip link set lo up", "ip addr add 127.0.0.2/8 dev lo", "pids=()"]
    for i, cmd in enumerate(commands):
        body.append(f"( {cmd} ) > {tmp_path}/node{i}.log 2>&1 & pids+=($!)")
    body.append('status=0; for p in "${pids[@]}"; do wait "$p" || status=$?; done; exit $status')
    proc = subprocess.run(["unshare", "-n", "bash", "-c", "\n".join(body)], cwd=REPO, env=entry_env(),
                          capture_output=True, text=True, timeout=timeout)
    logs = "".join(open(tmp_path / f"node{i}.log").read()[-3000:] for i in range(len(commands)))
    assert proc.returncode == 0, proc.stderr + logs


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    data = write_token_dataset(str(tmp / "tokens"))
    args = tiny_cli_args(data, train_iters=3, zero_stage=2, global_batch_size=4)

    def trainer(run_dir):
        return shlex.join([*args, "--run-dir", str(run_dir)])

    # The reference: one node, two processes.
    _in_namespace([f"{PYTHON} -m torch.distributed.run --nnodes 1 --nproc_per_node 2 --master_addr 127.0.0.1 "
                   f"--master_port {PORT} -m megatron_mixln.pretrain {trainer(tmp / 'one_node')}"], tmp)
    return tmp, trainer, _losses(tmp / "one_node")


def test_torchrun_two_nodes_match_one_node(job):
    tmp, trainer, reference = job
    run = tmp / "torchrun"
    nodes = [f"{PYTHON} -m torch.distributed.run --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d "
             f"--rdzv_endpoint 127.0.0.1:{PORT} --rdzv_id mixln-test --local_addr 127.0.0.{n + 1} "
             f"-m megatron_mixln.pretrain {trainer(run)}" for n in range(2)]
    _in_namespace(nodes, tmp)
    assert json.load(open(run / "config.json"))["world_size"] == 2
    assert len(reference) == 3 and _losses(run) == pytest.approx(reference, rel=1e-6)


def test_deepspeed_hostfile_two_nodes_match_one_node(job):
    tmp, trainer, reference = job
    run = tmp / "deepspeed"
    hostfile = tmp / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    nodes = [f"{PYTHON} -m deepspeed.launcher.runner --hostfile {hostfile} --no_ssh --node_rank {n} "
             f"--master_addr 127.0.0.1 --master_port {PORT} --module megatron_mixln.pretrain {trainer(run)}"
             for n in range(2)]
    _in_namespace(nodes, tmp)
    assert json.load(open(run / "config.json"))["world_size"] == 2
    assert _losses(run) == pytest.approx(reference, rel=1e-6)
