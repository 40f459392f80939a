"""Pretraining entry point: `python -m megatron_mixln.pretrain --help` (also under deepspeed/torchrun)."""

if __name__ == "__main__":  # first thing: a preemption signal during start-up must not kill the process
    from megatron_mixln.training.signals import install_early_handlers

    install_early_handlers()

from megatron_mixln.training.main import main, run_and_exit  # noqa: E402,F401

if __name__ == "__main__":
    run_and_exit()
