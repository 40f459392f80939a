"""The training engine: DeepSpeed pretraining with evaluation, checkpoints, logging and stability guards.

Entry point: `python -m megatron_mixln.pretrain` (see main.py). Heavy imports (DeepSpeed) happen
inside functions, so `--help` and config checks stay fast.
"""
from megatron_mixln.training.config import TrainingConfig, gradient_accumulation_steps

__all__ = ["TrainingConfig", "gradient_accumulation_steps"]
