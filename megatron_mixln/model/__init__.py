"""The model: plain PyTorch. Parallelism, checkpointing and compilation are applied from outside."""
from megatron_mixln.model.block import Block
from megatron_mixln.model.config import ModelConfig
from megatron_mixln.model.init import init_weights
from megatron_mixln.model.norms import Norm
from megatron_mixln.model.positions import POSITIONS, format_positions, resolve_positions
from megatron_mixln.model.presets import PAPER_POST_LN_LAYERS, PRESETS
from megatron_mixln.model.transformer import Transformer, build_model, count_parameters

__all__ = [
    "Block", "ModelConfig", "Norm", "Transformer", "build_model", "count_parameters", "init_weights",
    "POSITIONS", "PRESETS", "PAPER_POST_LN_LAYERS", "format_positions", "resolve_positions",
]
