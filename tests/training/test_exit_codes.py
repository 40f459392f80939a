"""Every exit path of every rank ends with the documented code (megatron_mixln.training.main), never
with SIGABRT from a process group left alive at exit: two ranks started by torch.multiprocessing
(spawn, as the project's tests start jobs), env:// rendezvous on 127.0.0.1, GLOO_SOCKET_IFNAME=lo,
each running the command line's `run_and_exit`.

- finished -> 0 on both ranks;
- diverged (non-finite steps, --max-bad-steps 1) -> 3 on both ranks;
- bad input found after collectives ran (--load of a checkpoint of another vocabulary) -> 2 on both.
(A failed rendezvous -> 4 through the same run_and_exit: tests/training/test_launch_failures.py.)
"""
import os
import socket

import pytest
import torch.multiprocessing as mp

from training_testlib import LOOPBACK_ENV, tiny_cli_args, write_token_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, argv, log_dir):
    os.environ.update(LOOPBACK_ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fd = os.open(os.path.join(log_dir, f"rank{rank}.err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)  # this rank's stderr, read by the test
    from megatron_mixln.training.main import run_and_exit

    run_and_exit(argv)


def _run(tmp_path, name, argv, world=2, ranks=None):
    """Exit codes (negative: killed by that signal) and stderr of each rank."""
    log_dir = tmp_path / name
    log_dir.mkdir()
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, argv, str(log_dir))) for r in (ranks or range(world))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.exitcode is None:
            p.kill()
    errs = [open(log_dir / f"rank{r}.err").read() for r in (ranks or range(world))]
    return [p.exitcode for p in procs], errs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(str(tmp_path_factory.mktemp("data") / "tokens"))


def test_finished_and_diverged_runs_exit_with_their_codes(tmp_path, data):
    save = str(tmp_path / "ckpt")
    codes, errs = _run(tmp_path, "ok", tiny_cli_args(data, train_iters=2, save=save, save_interval=2))
    assert codes == [0, 0], errs
    assert not any("terminate called" in e for e in errs), errs
    codes, errs = _run(tmp_path, "diverged", tiny_cli_args(data, lr="1e30", clip_grad=0, max_bad_steps=1,
                                                           train_iters=6))
    assert codes == [3, 3], errs
    assert "consecutive steps had non-finite loss" in errs[0] and "terminate called" not in "".join(errs), errs
    # bad input after the rendezvous and the checkpoint verification's collectives
    codes, errs = _run(tmp_path, "bad", tiny_cli_args(data, load=save, vocab_size=512))
    assert codes == [2, 2], errs
    for rank, err in enumerate(errs):
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(lines) == 1 and "--vocab-size: checkpoint 256 vs now 512" in lines[0], err
        assert "give --vocab-size 256" in lines[0], err  # the fix, in the same line
        assert ("[rank 1] " in lines[0]) == (rank == 1) and "Traceback" not in err, err

