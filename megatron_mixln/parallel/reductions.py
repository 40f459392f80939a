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
    if params and params[0].device.type != "meta":
        return params[0].device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def global_num_parameters(module: torch.nn.Module, state) -> int:
    """Parameters of the whole model (a tied weight once), whatever this rank holds of it. Collective."""
    return global_param_counts(_unique_params(module), state)[1]


def global_param_counts(params, state) -> tuple[int, int]:
    """(tensors, elements) of the whole model that `params` (this rank's pieces, each listed once) stand
    for: a TP-sharded tensor counts once with all its shards' elements, a replicated one once, pipeline
    stages add up; ZeRO-3's partitioned parameters count their full size (`ds_numel`). Collective over
    the model-parallel group."""
    params = list(params)
    tensors = sum(1 for p in params if state is None or state.tp_rank == 0)
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in params if _counts_here(p, state))
    total = torch.tensor([float(tensors), float(numel)], dtype=torch.float64, device=_device(params))
    tensors, numel = _sum_over_model_parallel(total, state).tolist()
    return int(tensors), int(numel)


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


@torch.no_grad()
def clip_grad_norm_(module: torch.nn.Module, state, max_norm: float) -> float:
    """Clip `p.grad` of every parameter of `module` in place by ONE coefficient shared by the whole
    model: c = min(1, max_norm / (norm + 1e-6)) with norm = `global_grad_norm(module, state)` (TP shards
    summed, replicated norms counted once, pipeline stages added) -- the formula of torch's and
    Megatron's `clip_grad_norm_`. Every rank of the model-parallel group gets the same c.

    Returns the norm before clipping (NaN/Inf when a gradient is not finite: then nothing is scaled and
    the caller's step guard skips the update). Collective over the model-parallel group.
    """
    norm = global_grad_norm(module, state)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in _unique_params(module):
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
