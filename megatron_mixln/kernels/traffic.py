"""Count the operators a computation dispatches and the bytes they read and write (eager, op level).

In eager mode every non-view operator is (at least) one kernel that reads its tensor inputs and
writes its outputs, so the counts are a launch count and a memory-traffic model: what fusing two
operators into one saves shows directly. Custom ops (the fused `mixln::add_norm_fwd/bwd`) count as
one kernel each; what they do inside is not seen. Views and metadata-only ops move nothing and are
skipped. Backward operators are counted too when `.backward()` runs inside the context.

    with TrafficCounter() as c:
        loss = model(tokens).sum(); loss.backward()
    c.kernels, c.bytes, c.count("aten.add.Tensor")
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_FREE = {"aten.detach.default", "aten.lift_fresh.default", "aten._to_copy.default_noop"}


class TrafficCounter(TorchDispatchMode):
    """`ops`: Counter of operator name -> calls; `kernels`: non-view calls; `bytes`: their input
    plus output tensor bytes (each distinct tensor once per call)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.kernels = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if getattr(func, "is_view", False) or name in _FREE:
            return out
        self.ops[name] += 1
        self.kernels += 1
        seen = set()
        for t in tree_flatten((args, kwargs or {}, out))[0]:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                self.bytes += t.numel() * t.element_size()
        return out

    def count(self, name: str) -> int:
        return self.ops[name]
