"""Which dimension of each plain state-dict entry is split over TP, and splitting/merging by key.

One table serves `apply_tensor_parallel` (modules) and the checkpoint converter (state dicts):

    column-parallel (dim 0): q_proj, k_proj, v_proj, gate_proj, up_proj, lm_head, embed (vocab rows),
                             and the biases of the column-parallel linears (split with their rows)
    row-parallel    (dim 1): o_proj, down_proj weights
    replicated             : every norm weight/bias, the o_proj/down_proj biases (added after the sum)

Heads occupy contiguous blocks of head_dim rows in q/k/v, so a contiguous split gives each rank
whole query heads and their matching key/value heads (GQA: kv heads split when groups % tp == 0).
"""
from __future__ import annotations

import torch

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head", "embed")
ROW_PARALLEL = ("o_proj", "down_proj")


def tp_partition_dim(key: str) -> int | None:
    """0, 1 or None (replicated) for a plain state-dict key such as 'layers.3.attn.q_proj.weight'."""
    parts = key.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    if module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL:
        return None if parts[-1] == "bias" else 1
    return None


def split_tp(state_dict: dict, tp_size: int, tp_rank: int) -> dict:
    """This TP rank's slice of a plain (full) state dict."""
    out = {}
    for key, value in state_dict.items():
        dim = tp_partition_dim(key)
        if dim is None or tp_size == 1:
            out[key] = value.clone()
            continue
        if value.shape[dim] % tp_size:
            raise ValueError(f"{key}: size {value.shape[dim]} of dim {dim} is not divisible by TP={tp_size}")
        out[key] = value.chunk(tp_size, dim=dim)[tp_rank].clone()
    return out


def merge_tp(shards: list[dict], check_replicated: bool = True) -> dict:
    """Concatenate TP shards (ordered by TP rank) back into one plain state dict."""
    keys = list(shards[0])
    for r, shard in enumerate(shards[1:], 1):
        if list(shard) != keys:
            raise ValueError(f"TP shard {r} has different keys from shard 0")
    out = {}
    for key in keys:
        dim = tp_partition_dim(key)
        values = [s[key] for s in shards]
        if dim is None:
            if check_replicated and any(not torch.equal(values[0], v) for v in values[1:]):
                raise ValueError(f"{key}: replicated parameter differs between TP ranks")
            out[key] = values[0].clone()
        else:
            out[key] = torch.cat(values, dim=dim)
    return out
