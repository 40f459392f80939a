"""LayerNorm Pre-LN weights -> RMSNorm weights with the same outputs (Pre-RMSNorm, arXiv 2305.14858).

In a Pre-LN model only the embedding and the sublayer outputs (o_proj, down_proj) write into the
residual stream. Recentring them -- each embedding row minus its mean over hidden, each output
projection's columns minus their mean over its output rows (the paper's Sec. 3: a zero-mean main
branch) -- makes every residual-stream vector zero-mean, so LayerNorm's centring is a no-op:

    LayerNorm(x) = γ·(x - μ)/sqrt(var + ε) + β  =  γ·x/sqrt(mean(x²) + ε) + β  = RMSNorm(x) + β   (μ = 0)

and the LayerNorm checkpoint becomes an RMSNorm one. The norms feed linears (q/k/v, gate/up, the LM
head) that have no bias in this LLaMA-family stack, so β has nowhere to go: the conversion is exact
only when every norm's β is zero, and refused otherwise (the HF export to StableLmForCausalLM keeps
LayerNorm exactly instead).
"""
from __future__ import annotations

import json

import torch

from megatron_mixln.errors import UsageError

RESIDUAL_WRITERS = ("o_proj.weight", "down_proj.weight")  # nn.Linear (out=hidden, in): centre over dim 0
PRE_LN_POSITIONS = ("pre", "lns")


def check_convertible(config, plain: dict, source: str) -> None:
    """Raise UsageError (one line naming `source`) unless `config`/`plain` is a LayerNorm Pre-LN model
    whose every norm has β = 0 exactly."""
    if config is None:
        raise UsageError(f"{source}: no model config; pass --config (the ModelConfig JSON of the run)")
    reasons = []
    if config.normalization != "LayerNorm":
        reasons.append(f"--normalization is {config.normalization}, not LayerNorm")
    others = sorted(set(config.positions) - set(PRE_LN_POSITIONS))
    if others:
        reasons.append(f"--norm-position has {', '.join(others)} layers (only pre/lns layers keep the stream un-normalised)")
    if not config.final_norm:
        reasons.append("--no-final-norm (the LM head would see the recentred stream)")
    if config.qk_norm != "none":
        reasons.append(f"--qk-norm {config.qk_norm} (q/k LayerNorms see non-centred projections)")
    if config.tie_embeddings:
        reasons.append("--tie-embeddings (recentring the embedding would change the LM head)")
    if reasons:
        raise UsageError(f"{source}: --to rmsnorm needs a LayerNorm Pre-LN model: {'; '.join(reasons)}")
    nonzero = [k for k, v in plain.items() if k.endswith("norm.bias") and bool(v.ne(0).any())]
    if nonzero:
        raise UsageError(
            f"{source}: {len(nonzero)} LayerNorm biases are non-zero (first {nonzero[0]}): folding β needs biases on "
            "q/k/v, gate/up and the LM head, which this model does not have; for an exact copy export it with "
            "tools/convert_to_hf.py (StableLmForCausalLM keeps LayerNorm)")


def recentre(plain: dict) -> dict:
    """The Pre-RMSNorm weights: embedding rows and residual-writing projections made zero-mean over
    hidden (computed in float64, stored in each tensor's dtype); LayerNorm biases (all zero) dropped."""
    out = {}
    for key, value in plain.items():
        if key.endswith("norm.bias"):
            continue
        if key == "embed.weight":  # (vocab, hidden): each token's vector
            value = _centre(value, dim=1)
        elif key.endswith(RESIDUAL_WRITERS):  # (hidden, in): every output vector W·a is zero-mean
            value = _centre(value, dim=0)
        out[key] = value
    return out


def _centre(w: torch.Tensor, dim: int) -> torch.Tensor:
    w64 = w.to(torch.float64)
    return (w64 - w64.mean(dim=dim, keepdim=True)).to(w.dtype)


def to_rmsnorm(plain: dict, config, metadata: dict, source: str) -> tuple[dict, object, dict]:
    """(LayerNorm Pre-LN state dict, ModelConfig, trainer metadata) -> the RMSNorm ones with equal outputs.

    Every place that records the model config (client state "model_config", the mixln_meta.json
    sidecar) is updated, so a resume builds the RMSNorm model. Raises UsageError (see check_convertible)."""
    check_convertible(config, plain, source)
    new_config = config.replace(normalization="RMSNorm")
    return recentre(plain), new_config, _with_config(metadata, new_config.to_dict())


def _with_config(metadata: dict, config_dict: dict) -> dict:
    """`metadata` with every recorded "model_config" (top level, under "mixln", in JSON sidecars) replaced."""
    from megatron_mixln.checkpoint.convert import SIDECARS

    out = dict(metadata)
    if isinstance(out.get("model_config"), dict):
        out["model_config"] = config_dict
    if isinstance(out.get("mixln"), dict) and isinstance(out["mixln"].get("model_config"), dict):
        out["mixln"] = dict(out["mixln"], model_config=config_dict)
    sidecars = dict(out.get(SIDECARS) or {})
    for name, text in sidecars.items():
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("model_config"), dict):
            sidecars[name] = json.dumps(dict(data, model_config=config_dict), indent=2, sort_keys=True)
    if sidecars:
        out[SIDECARS] = sidecars
    return out
