"""Optimizer parameter groups (weight decay or not) decided from the model's structure and names.

Megatron-LM's rule: decoupled weight decay on the weight matrices (linears, embeddings, the LM head),
none on norm gains and biases. The decision reads *what a parameter is* -- the module that owns it and
its name -- never `p.shape` alone: under ZeRO-3's partitioned construction (`deepspeed.zero.Init`) every
parameter already has shape (0,) when the groups are built, and a shape rule would silently put every
tensor in the no-decay group. Where a module type is not known (a new layer), the parameter's true
shape decides (`ds_shape` under ZeRO-3, else `shape`): at least 2-D decays.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_mixln.model.norms import Norm
from megatron_mixln.model.two_stream import ChannelScale

# gains (norms; SiameseNorm's c1 and the learnable embedding scale) are never decayed
NORM_TYPES = (Norm, ChannelScale, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
NO_DECAY_NAMES = ("bias",)


def decays(owner: nn.Module, name: str, param: torch.Tensor) -> bool:
    """Whether `owner.<name>` (a direct parameter of `owner`) gets weight decay."""
    if isinstance(owner, NORM_TYPES) or name in NO_DECAY_NAMES:
        return False
    return len(getattr(param, "ds_shape", param.shape)) >= 2


def split_decay(model: nn.Module) -> tuple[list, list]:
    """(decay, no_decay) lists of the trainable parameters of `model`, each tensor once (a tied weight is
    listed under its first owner), in `named_parameters` order."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if decays(module, name, p) else no_decay).append(p)
    order = {id(p): i for i, p in enumerate(model.parameters())}
    return sorted(decay, key=lambda p: order[id(p)]), sorted(no_decay, key=lambda p: order[id(p)])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    (a group with no parameter on this rank is left out)."""
    decay, no_decay = split_decay(model)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def param_group_counts(model: nn.Module, state=None) -> dict:
    """The whole model's {"decay_tensors", "decay_parameters", "no_decay_tensors", "no_decay_parameters"}
    (TP shards and pipeline stages summed). Collective over the model-parallel group: call it on every rank."""
    from megatron_mixln.parallel.reductions import global_param_counts

    decay, no_decay = split_decay(model)
    (dt, dn), (nt, nn_) = global_param_counts(decay, state), global_param_counts(no_decay, state)
    return {"decay_tensors": dt, "decay_parameters": dn, "no_decay_tensors": nt, "no_decay_parameters": nn_}


def describe_param_groups(counts: dict, weight_decay: float) -> str:
    """One log line from `param_group_counts`."""
    return (f"parameter groups: weight decay {weight_decay:g} on {counts['decay_tensors']} tensors "
            f"({counts['decay_parameters']:,} parameters), none on {counts['no_decay_tensors']} tensors "
            f"({counts['no_decay_parameters']:,} parameters: norm gains, biases)")
