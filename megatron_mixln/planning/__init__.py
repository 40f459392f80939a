"""Memory planning: per-GPU and per-node memory of a training layout, before a cluster is allocated."""
from megatron_mixln.planning.activations import activation_bytes, block_activation_bytes
from megatron_mixln.planning.layout import Layout, LayoutError
from megatron_mixln.planning.model_states import ModelStates, model_states, param_counts
from megatron_mixln.planning.plan import MemoryPlan, format_plan, plan_memory, zero_buffers

__all__ = ["Layout", "LayoutError", "ModelStates", "model_states", "param_counts", "activation_bytes",
           "block_activation_bytes", "MemoryPlan", "plan_memory", "format_plan", "zero_buffers"]
