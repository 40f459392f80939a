"""Byte counting of real tensors for the planning tests: unique storages reachable from a DeepSpeed
engine's optimizer (by walking its attributes) and saved-for-backward tensors of a forward pass."""
from __future__ import annotations

import torch


def reachable_tensors(obj, out=None, seen=None, depth=0):
    """Every tensor reachable from `obj` through DeepSpeed/torch.optim object attributes, containers,
    parameters' .grad and ZeRO-3 .ds_tensor (modules themselves are not entered)."""
    out = [] if out is None else out
    seen = set() if seen is None else seen
    if depth > 8 or id(obj) in seen:
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        for extra in (obj.grad, getattr(obj, "ds_tensor", None)):
            if isinstance(extra, torch.Tensor):
                reachable_tensors(extra, out, seen, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            reachable_tensors(v, out, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            reachable_tensors(v, out, seen, depth + 1)
    elif not isinstance(obj, torch.nn.Module) and type(obj).__module__.startswith(("deepspeed", "torch.optim")) \
            and hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            reachable_tensors(v, out, seen, depth + 1)
    return out


def storage_bytes(tensors, dtype=None, exclude=()) -> dict[int, int]:
    """{storage address: bytes} of the distinct non-empty storages (optionally of one dtype)."""
    found = {}
    for t in tensors:
        if t is None or (dtype is not None and t.dtype != dtype):
            continue
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in exclude:
            found[s.data_ptr()] = s.nbytes()
    return found


def saved_tensor_bytes(fn, exclude_params=()) -> int:
    """Run fn() under saved_tensors_hooks; bytes of the distinct storages autograd saved for backward,
    parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in exclude_params}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result
