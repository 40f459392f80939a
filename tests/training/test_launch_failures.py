"""Start-up under a launcher: a preemption signal before the training loop is kept (not fatal); a
missing data path fails before the rendezvous; a rendezvous nobody answers ends the rank after
--distributed-timeout-minutes with one line naming MASTER_ADDR and MASTER_PORT (exit code 4).
Only loopback is used: rank 1 dials 127.0.0.1 on a port where nothing listens."""
import os
import signal
import socket
import subprocess
import time

from training_testlib import PYTHON, REPO, entry_env, tiny_cli_args, write_token_dataset

from megatron_mixln.training.signals import PREEMPTION_SIGNALS, PreemptionFlag, install_early_handlers


def test_a_signal_before_the_loop_raises_its_flag():
    saved = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    try:
        install_early_handlers()
        os.kill(os.getpid(), signal.SIGUSR1)  # e.g. Slurm's USR1 during the rendezvous: not fatal
        flag = PreemptionFlag()
        assert flag.requested and flag.signal_name == "SIGUSR1"
        flag.restore()
        fresh = PreemptionFlag()
        assert not fresh.requested  # consumed once
        fresh.restore()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while starting: the same outcome, not a traceback
        flag = PreemptionFlag()
        assert flag.signal_name == "SIGINT"
        flag.restore()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def _as_rank1(argv, port):
    env = dict(entry_env(), RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    start = time.time()
    proc = subprocess.run([PYTHON, "-m", "megatron_mixln.pretrain", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc, time.time() - start


def test_missing_data_fails_before_the_rendezvous(tmp_path):
    port = _closed_port()
    proc, _ = _as_rank1(tiny_cli_args(str(tmp_path / "nothing"), distributed_timeout_minutes=5), port)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert errors == [f"[rank 1] error: --data-path: {tmp_path}/nothing.bin does not exist "
                      f"(expected the pair {tmp_path}/nothing.bin/.idx)"], proc.stderr


def test_unanswered_rendezvous_ends_with_one_line(tmp_path):
    data = write_token_dataset(str(tmp_path / "tokens"))
    port = _closed_port()
    proc, seconds = _as_rank1(tiny_cli_args(data, distributed_timeout_minutes=0.05), port)
    assert proc.returncode == 4, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"[rank 1] error: rendezvous with MASTER_ADDR=127.0.0.1 MASTER_PORT={port} failed "
                                "within 0.05 min (rank 1 of 2): "), errors
    assert seconds < 120
