"""`python -m megatron_mixln.pretrain`: parse, train, exit with a status a scheduler understands.

Exit codes (megatron_mixln.errors; docs/errors.md): 0 finished, preempted (checkpoint saved) or stopped
at --exit-interval or --exit-duration-in-mins; 2 bad input (one line naming the flag or file);
3 diverged (too many non-finite steps); 4 the rendezvous failed (one line naming MASTER_ADDR and
MASTER_PORT); 124 hung (no progress for --hang-timeout seconds: stacks dumped by
megatron_mixln.training.watchdog).
"""
from __future__ import annotations

from megatron_mixln.errors import EXIT_DIVERGED, EXIT_OK, UsageError, print_error, run_tool

PROG = "pretrain"


def main(argv: list[str] | None = None) -> int:
    return run_tool(_pretrain, PROG, argv)


def _pretrain(argv: list[str] | None) -> int:
    import torch.distributed as dist

    from megatron_mixln.training.arguments import parse_configs

    caller_owns_group = dist.is_initialized()  # e.g. a test harness: leave its group alone
    try:
        model_config, cfg = parse_configs(argv)
        from megatron_mixln.training.trainer import pretrain

        summary = pretrain(model_config, cfg)
    except NotImplementedError as exc:  # a combination of flags this build does not support
        raise UsageError(str(exc)) from None
    finally:
        if not caller_owns_group:
            _shutdown()
    if summary.stop_reason == "diverged":
        print_error(PROG, f"{cfg.max_bad_steps} consecutive steps had non-finite loss or gradients (last good weights "
                          f"{'saved in ' + cfg.save if cfg.save else 'not saved: no --save'}); stopping. Lower --lr, "
                          "lengthen --lr-warmup-iters or check the data")
        return EXIT_DIVERGED
    return EXIT_OK


def _shutdown() -> None:
    from megatron_mixln.training.distributed import shutdown_distributed

    shutdown_distributed()
