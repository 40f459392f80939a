"""The Mix-LN paper's two layer-effectiveness diagnostics (docs/paper.md#diagnostics).

- Angular distance between the hidden state entering layer l and the one n layers later, on the
  last token: d = arccos(cos(h_l, h_{l+n})) / pi, averaged over samples (all (l, n), as the
  paper's heatmaps; the reference code sums and compares n = 1 only).
- Performance drop when one layer is removed: dP(l) = P(without layer l) - P(full model), with P the
  perplexity (exp of the token-weighted mean NLL). A removed block keeps nothing of its own; the
  others keep their position and LNS scale.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from megatron_mixln.model.block import resolve_stream
from megatron_mixln.model.positions import TWO_STREAM


@torch.no_grad()
def hidden_states(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """[embedding output, output of layer 1, ..., output of layer L] (before the final norm). A
    two-stream layer (siamese, residual-dual) contributes its first stream x (the post-norm one)."""
    h = model.embed(tokens)
    states = [h]
    for layer in model.layers:
        h = layer(h)  # a (h, d) pair after a layer that hands its last add to the next one
        states.append(h[0] if layer.position in TWO_STREAM else resolve_stream(h))
    return states


@torch.no_grad()
def angular_distances(model, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """D[l, n] = mean over samples of arccos(cos(h_l[-1], h_{l+n}[-1])) / pi, float64, shape (L+1, L+1).

    h_0 is the embedding output, h_l the output of layer l; entries with n = 0 or l + n > L are NaN.
    """
    L = len(model.layers)
    total = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    count = 0
    for tokens in batches:
        last = torch.stack([h[:, -1].double() for h in hidden_states(model, tokens)])  # (L+1, B, H)
        unit = F.normalize(last, dim=-1)
        cos = torch.einsum("ibh,jbh->ijb", unit, unit).clamp(-1.0, 1.0)
        total += (torch.arccos(cos) / math.pi).sum(-1).cpu()
        count += tokens.shape[0]
    dist = total / max(count, 1)
    out = torch.full((L + 1, L + 1), float("nan"), dtype=torch.float64)
    for l in range(L + 1):
        for n in range(1, L + 1 - l):
            out[l, n] = dist[l, l + n]
    return out


@torch.no_grad()
def perplexity(model, batches: Iterable[torch.Tensor]) -> float:
    """exp(token-weighted mean NLL); each batch holds seq+1 tokens per sample."""
    nll, tokens_seen = 0.0, 0
    for tokens in batches:
        logits = model(tokens[:, :-1])
        nll += F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum").item()
        tokens_seen += tokens[:, 1:].numel()
    return math.exp(nll / tokens_seen)


@torch.no_grad()
def layer_removal_drop(model, batches: list[torch.Tensor]) -> list[dict]:
    """One row per layer: {"layer", "position", "perplexity", "drop"} with drop = P(without l) - P(full)."""
    full = perplexity(model, batches)
    layers = model.layers
    rows = []
    try:
        for i, block in enumerate(layers):
            model.layers = torch.nn.ModuleList(b for j, b in enumerate(layers) if j != i)
            p = perplexity(model, batches)
            rows.append({"layer": block.layer_number, "position": block.position, "perplexity": p, "drop": p - full})
    finally:
        model.layers = layers
    return rows
