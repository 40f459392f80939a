"""`python -m megatron_mixln.pretrain`: parse, train, exit with a status a scheduler understands.

Exit codes: 0 finished, stopped by SIGTERM, SIGUSR1 or SIGINT (Ctrl-C; checkpoint saved) or at
--exit-interval or --exit-duration-in-mins;
2 bad input (a one-line message naming the flag or file); 3 diverged (too many non-finite steps);
4 the rendezvous failed (a one-line message naming MASTER_ADDR and MASTER_PORT);
124 hung (no progress for --hang-timeout seconds: stacks dumped by megatron_mixln.training.watchdog);
130 a second Ctrl-C (aborted at once, nothing saved: megatron_mixln.training.signals).
"""
from __future__ import annotations

import os
import sys

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
