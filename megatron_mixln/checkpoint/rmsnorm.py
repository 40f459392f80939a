"""LayerNorm Pre-LN weights -> RMSNorm weights with the same outputs (Pre-RMSNorm, arXiv 2305.14858).

In a Pre-LN model only the embedding and the sublayer outputs (o_proj, down_proj, with their biases)
write into the residual stream. Recentring them -- each embedding row minus its mean over hidden,
each output projection's columns and bias minus their mean over its output rows (the paper's Sec. 3:
a zero-mean main branch) -- makes every residual-stream vector zero-mean, so LayerNorm's centring is a
no-op:

    LayerNorm(x) = γ·(x - μ)/sqrt(var + ε) + β  =  γ·x/sqrt(mean(x²) + ε) + β  = RMSNorm(x) + β   (μ = 0)

Each norm feeds linears, so β moves into their biases (the affine term folded into the next linear):

    W·(s·(RMSNorm(x) + β)) + b = W·(s·RMSNorm(x)) + (b + s·W·β)

with s the layer's LNS scale 1/sqrt(l) (1 for pre layers). So b += s·W·β for q/k/v (after the attention input
norm), gate/up (after the MLP input norm) and the LM head (after the final norm); the config gains
the bias options this needs (--add-qkv-bias, --add-bias-linear, --add-output-layer-bias) only where a
β is non-zero, so a model whose β are all zero stays bias-free.
"""
from __future__ import annotations

import json

import torch

from megatron_mixln.errors import UsageError
from megatron_mixln.model.positions import lns_scale

RESIDUAL_WRITERS = ("o_proj.weight", "down_proj.weight", "o_proj.bias", "down_proj.bias")  # centred over dim 0
PRE_LN_POSITIONS = ("pre", "lns")
# norm -> the linears that read its output, and the bias option those linears need
FOLDS = {"attn_norm": (("attn.q_proj", "attn.k_proj", "attn.v_proj"), "add_qkv_bias"),
         "mlp_norm": (("mlp.gate_proj", "mlp.up_proj"), "add_bias_linear")}


def check_convertible(config, source: str) -> None:
    """Raise UsageError (one line naming `source` and the flags) unless `config` is a LayerNorm Pre-LN
    model with a final norm and an untied LM head."""
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


def _nonzero(plain: dict, key: str) -> bool:
    return key in plain and bool(plain[key].ne(0).any())


def needed_bias_options(plain: dict, config) -> dict:
    """The bias options (ModelConfig fields) the folded model needs: each only where some β is non-zero."""
    out = {}
    for norm, (_, option) in FOLDS.items():
        if any(_nonzero(plain, f"layers.{i}.{norm}.bias") for i in range(config.num_layers)):
            out[option] = True
    if _nonzero(plain, "final_norm.bias"):
        out["add_output_layer_bias"] = True
    return out


def fold_and_recentre(plain: dict, config, new_config) -> dict:
    """The Pre-RMSNorm weights of `new_config` (float64 arithmetic, each tensor stored in its dtype):
    embedding rows and residual writers (o/down weights and biases) zero-mean over hidden; each norm's β
    folded into the biases of the linears after it (b += s·W·β); the LayerNorm biases dropped; a bias the
    new config has and `plain` lacks starts at zero."""
    from megatron_mixln.model import build_model

    expected = build_model(new_config, device="meta").state_dict()
    out = {}
    for key, meta in expected.items():
        if key in plain:
            out[key] = plain[key]
        else:  # a bias the folding (or the options it needs) adds
            out[key] = torch.zeros(meta.shape, dtype=plain[key.rsplit(".", 1)[0] + ".weight"].dtype)
    out["embed.weight"] = _centre(out["embed.weight"], dim=1)  # (vocab, hidden): each token's vector
    for key in out:
        if key.endswith(RESIDUAL_WRITERS):  # (hidden, in) / (hidden,): every output W·a + b is zero-mean
            out[key] = _centre(out[key], dim=0)
    for i, position in enumerate(config.positions):
        s = lns_scale(position, i + 1)
        for norm, (linears, _) in FOLDS.items():
            for lin in linears:
                _fold(out, plain.get(f"layers.{i}.{norm}.bias"), f"layers.{i}.{lin}", s)
    _fold(out, plain.get("final_norm.bias"), "lm_head", 1.0)
    return out


def _fold(out: dict, beta, linear: str, scale: float) -> None:
    """out[linear.bias] += scale·W·β (float64), when β is non-zero."""
    if beta is None or not bool(beta.ne(0).any()):
        return
    w, b = out[f"{linear}.weight"], out[f"{linear}.bias"]
    folded = b.to(torch.float64) + scale * (w.to(torch.float64) @ beta.to(torch.float64))
    out[f"{linear}.bias"] = folded.to(b.dtype)


def _centre(w: torch.Tensor, dim: int) -> torch.Tensor:
    w64 = w.to(torch.float64)
    return (w64 - w64.mean(dim=dim, keepdim=True)).to(w.dtype)


def to_rmsnorm(plain: dict, config, metadata: dict, source: str) -> tuple[dict, object, dict]:
    """(LayerNorm Pre-LN state dict, ModelConfig, trainer metadata) -> the RMSNorm ones with equal outputs,
    for any LayerNorm β (folded into linear biases, see the module docstring).

    Every place that records the model config (client state "model_config", the mixln_meta.json
    sidecar) is updated, so a resume builds the RMSNorm model. Raises UsageError (see check_convertible)."""
    check_convertible(config, source)
    new_config = config.replace(normalization="RMSNorm", **needed_bias_options(plain, config))
    return fold_and_recentre(plain, config, new_config), new_config, _with_config(metadata, new_config.to_dict())


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
