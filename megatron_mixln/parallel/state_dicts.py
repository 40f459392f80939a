"""Plain (unsharded, `Transformer`-keyed) state dicts <-> a TP-sharded model or pipeline stage in memory.

Plain keys are the `Transformer`'s own: embed.weight, layers.{i}.attn.q_proj.weight, ...,
final_norm.weight, lm_head.weight. A pipeline module names its layers by global index
("0.embed.weight", "3.attn.q_proj.weight", "{L+1}.lm_head.weight"); `pipeline_layer_prefix` maps one
to the other, and is also the mapping of DeepSpeed's per-layer checkpoint files.
"""
from __future__ import annotations

import torch

from megatron_mixln.parallel.mappings import all_gather_along
from megatron_mixln.parallel.sharding import split_tp, tp_partition_dim


def pipeline_layer_prefix(layer_idx: int, num_layers: int) -> str:
    """Plain-key prefix of pipeline layer `layer_idx` (0: embedding, 1..L: blocks, L+1: head)."""
    if layer_idx == 0 or layer_idx == num_layers + 1:
        return ""
    if 1 <= layer_idx <= num_layers:
        return f"layers.{layer_idx - 1}."
    raise ValueError(f"pipeline layer index {layer_idx} out of range for {num_layers} layers")


def is_pipeline_module(module) -> bool:
    return hasattr(module, "forward_funcs") and hasattr(module, "_grid")


def _plain_named(module, tensors: dict) -> dict:
    """Rename a module's local state-dict-style dict to plain keys."""
    if not is_pipeline_module(module):
        return dict(tensors)
    num_layers = module.model_config.num_layers
    out = {}
    for key, value in tensors.items():
        idx, _, rest = key.partition(".")
        out[pipeline_layer_prefix(int(idx), num_layers) + rest] = value
    return out


@torch.no_grad()
def load_plain_state_dict(module, full_state_dict: dict, state=None) -> None:
    """Copy this rank's slice of a full plain state dict into `module` (a TP-applied Transformer or a
    pipeline stage). Every local tensor must be found; extra keys (other stages) are ignored."""
    tp_size, tp_rank = (state.tp_size, state.tp_rank) if state is not None else (1, 0)
    local = module.state_dict(keep_vars=True)
    plain = _plain_named(module, {k: k for k in local})
    for plain_key, local_key in plain.items():
        if plain_key not in full_state_dict:
            raise KeyError(f"load_plain_state_dict: {plain_key} missing from the state dict")
        shard = split_tp({plain_key: full_state_dict[plain_key]}, tp_size, tp_rank)[plain_key]
        target = local[local_key]
        if target.shape != shard.shape:
            raise ValueError(f"{plain_key}: shape {tuple(shard.shape)} does not fit {tuple(target.shape)}")
        target.copy_(shard)


def _gather_tp(tensor: torch.Tensor, dim: int, state) -> torch.Tensor:
    return all_gather_along(tensor, dim, state.tp_group)


@torch.no_grad()
def gather_plain_tensors(module, state, grads: bool = False) -> dict:
    """This stage's parameters (or their gradients), TP shards gathered: {plain key: full tensor}.
    Collective over the TP group (every TP rank must call it)."""
    named = {name: (p.grad if grads else p) for name, p in module.named_parameters()}
    out = {}
    for key, value in _plain_named(module, named).items():
        if value is None:
            continue
        value = value.detach()
        dim = tp_partition_dim(key)
        replicated = dim is None or state is None or state.tp_size == 1
        out[key] = value.clone() if replicated else _gather_tp(value, dim, state)
    return out


def tensor_parallel_grad_getter(state, get_grad=None):
    """A `get_grad` for `diagnostics.layer_grad_norms` under TP: the full gradient of a sharded
    parameter (all-gathered over TP), the local one otherwise, so per-layer norms equal TP=1's.
    Collective: every TP rank must ask for the same parameters in the same order (layer_grad_norms does)."""
    get_grad = get_grad or (lambda p: p.grad)

    def full_grad(p):
        g = get_grad(p)
        if g is None or state is None or state.tp_size == 1 or not getattr(p, "tensor_model_parallel", False):
            return g
        return _gather_tp(g.detach(), p.partition_dim, state)

    return full_grad
