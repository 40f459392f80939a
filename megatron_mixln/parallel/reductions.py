"""Model-wide numbers from per-rank pieces (parameter counts, gradient norms) under TP/PP.

A rank holds TP shards (`param.tensor_model_parallel`: their pieces add up over the TP group) and
replicated parameters (norms: identical on every TP rank, so counted on TP rank 0 only); pipeline
stages hold disjoint layers. Summing those over the model-parallel group (TP x PP) gives the number
for the whole model; DP replicas are never summed.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _counts_here(p, state) -> bool:
    return getattr(p, "tensor_model_parallel", False) or state is None or state.tp_rank == 0


def _unique_params(module):
    return list({id(p): p for p in module.parameters()}.values())


def _sum_over_model_parallel(value: torch.Tensor, state) -> torch.Tensor:
    if state is not None and state.tp_size * state.pp_size > 1:
        dist.all_reduce(value, group=state.model_parallel_group)
    return value


def _device(params) -> torch.device:
    # a tensor for the collective on the parameters' device (NCCL needs accelerator tensors)
    return params[0].device if params and params[0].device.type != "meta" else torch.device("cpu")


def global_num_parameters(module: torch.nn.Module, state) -> int:
    """Parameters of the whole model (a tied weight once), whatever this rank holds of it. Collective."""
    params = _unique_params(module)
    local = sum(getattr(p, "ds_numel", p.numel()) for p in params if _counts_here(p, state))
    total = torch.tensor([float(local)], dtype=torch.float64, device=_device(params))
    return int(_sum_over_model_parallel(total, state).item())


@torch.no_grad()
def global_grad_norm(module: torch.nn.Module, state, get_grad=None) -> float:
    """L2 norm of the whole model's gradient (call after DP averaging, e.g. at the accumulation
    boundary of a ZeRO-0 engine). Collective over the model-parallel group."""
    get_grad = get_grad or (lambda p: p.grad)
    params = _unique_params(module)
    total = torch.zeros((), dtype=torch.float64, device=_device(params))
    for p in params:
        g = get_grad(p)
        if g is not None and _counts_here(p, state):
            total += g.detach().double().pow(2).sum()
    return math.sqrt(_sum_over_model_parallel(total, state).item())
