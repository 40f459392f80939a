"""Per-layer gradient norms (the Mix-LN paper's main diagnostic), as plain data.

After a backward pass, `layer_grad_norms(model)` gives one row per layer:
    {"layer": 1, "position": "post", "attn": 0.41, "mlp": 0.77, "attn_norm": 0.02, "mlp_norm": 0.03}
(peri layers add "attn_out_norm" and "mlp_out_norm"). Norms are L2 over all parameters of the
sublayer. `get_grad` lets a caller supply gradients that do not live in `p.grad`
(e.g. DeepSpeed ZeRO-2/3's `deepspeed.utils.safe_get_full_grad`).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

SUBLAYERS = ("attn", "mlp", "attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm")


def _norm_of(params: Iterable[torch.nn.Parameter], get_grad) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        g = get_grad(p)
        if g is not None:
            total += g.detach().double().pow(2).sum().cpu()
    return float(total.sqrt())


def layer_grad_norms(model: torch.nn.Module, get_grad: Callable | None = None) -> list[dict]:
    get_grad = get_grad or (lambda p: p.grad)
    rows = []
    for block in model.layers:
        row = {"layer": block.layer_number, "position": block.position}
        for name in SUBLAYERS:
            sub = getattr(block, name, None)
            if sub is not None:
                row[name] = _norm_of(sub.parameters(), get_grad)
        rows.append(row)
    return rows


def flatten_grad_norms(rows: list[dict], prefix: str = "grad_norm") -> dict[str, float]:
    """Rows -> {"grad_norm/layer_01/attn": ...}: the form metrics files and wandb take."""
    out = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("layer", "position"):
                out[f"{prefix}/layer_{row['layer']:02d}/{key}"] = value
    return out
