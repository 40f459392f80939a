"""Pretraining entry point: `python -m megatron_mixln.pretrain --help` (also under deepspeed/torchrun)."""
import sys

from megatron_mixln.training.main import main

if __name__ == "__main__":
    sys.exit(main())
