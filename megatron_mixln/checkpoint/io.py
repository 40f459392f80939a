"""Checkpoint file I/O that never unpickles arbitrary objects.

DeepSpeed's own checkpoint engine unpickles whatever a file holds. We load with weights_only=True;
the few plain data types DeepSpeed writes into its optimizer files (a namedtuple, an enum, the
loss-scaler record) are registered as safe globals -- nothing else is.
"""
from __future__ import annotations

import torch


def deepspeed_safe_globals() -> list:
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # reading without DeepSpeed installed (the converter): its records cannot occur
        return []
    return [fragment_address, ZeroStageEnum, LossScaler]


def safe_load(path: str, map_location=None):
    """torch.load with weights_only=True and only DeepSpeed's record types allowed."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_to_cpu(path: str):
    """safe_load onto the CPU. Raises RuntimeError naming the file when it holds anything but plain data."""
    try:
        return safe_load(path, map_location="cpu")
    except Exception as exc:  # e.g. a client_state holding arbitrary Python objects
        raise RuntimeError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({exc}). Keep client_state to "
            "tensors, numbers, strings, lists and dicts."
        ) from exc


def install_safe_checkpoint_engine(engine) -> None:
    """Make the engine's checkpoint loads go through safe_load (saving is unchanged)."""
    ckpt_engine = engine.checkpoint_engine
    ckpt_engine.load = lambda path, map_location=None: safe_load(path, map_location)
