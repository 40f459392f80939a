"""`python -m megatron_mixln.pretrain`: parse, train, exit with a status a scheduler understands.

Exit codes: 0 finished, stopped by SIGTERM, SIGUSR1 or SIGINT (Ctrl-C; checkpoint saved) or at
--exit-interval or --exit-duration-in-mins;
2 bad input (a one-line message naming the flag or file); 3 diverged (too many non-finite steps);
4 the rendezvous failed (a one-line message naming MASTER_ADDR and MASTER_PORT);
124 hung (no progress for --hang-timeout seconds: stacks dumped by megatron_mixln.training.watchdog);
130 a second Ctrl-C (aborted at once, nothing saved: megatron_mixln.training.signals).

Every exit path of every rank tears the process group down first (main's `finally`), and the command
line leaves through `run_and_exit`, which ends the process with os._exit once stdio is flushed and the
atexit handlers ran. DeepSpeed's engine keeps a clone of the world group (and its gloo threads) alive
after destroy_process_group; a normal interpreter exit would then run the C++ static destructors with a
joinable gloo thread, which ends in std::terminate ("terminate called without an active exception",
SIGABRT) instead of the documented code.
"""
from __future__ import annotations

import atexit
import os
import sys
import traceback

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_RENDEZVOUS = 0, 2, 3, 4


def _error(message: str) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from megatron_mixln.data.errors import DataError
    from megatron_mixln.training.arguments import parse_configs
    from megatron_mixln.training.config import UsageError
    from megatron_mixln.training.distributed import RendezvousError

    caller_owns_group = dist.is_initialized()  # e.g. a test harness: leave its group alone
    try:
        model_config, cfg = parse_configs(argv)
        from megatron_mixln.training.trainer import pretrain

        summary = pretrain(model_config, cfg)
    except (UsageError, DataError, NotImplementedError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except RendezvousError as exc:
        _error(str(exc))
        return EXIT_RENDEZVOUS
    finally:
        if not caller_owns_group:
            _shutdown()
    if summary["stop_reason"] == "diverged":
        _error(f"{cfg.max_bad_steps} consecutive steps had non-finite loss or gradients (last good weights "
               f"{'saved in ' + cfg.save if cfg.save else 'not saved: no --save'}); stopping. Lower --lr, "
               "lengthen --lr-warmup-iters or check the data")
        return EXIT_DIVERGED
    return EXIT_OK


def _shutdown() -> None:
    from megatron_mixln.training.distributed import shutdown_distributed

    shutdown_distributed()


def run_and_exit(argv: list[str] | None = None) -> "NoReturn":  # noqa: F821
    """`main(argv)`, then leave the process with its exit code (1 and a traceback for an unexpected error),
    skipping the C++ static destructors that would abort on a gloo thread still alive (module docstring)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's --help (0) and usage errors (2)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a bug: its traceback, then the same clean exit
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # wandb, the 1-rank file store's cleanup, ...
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
