"""Names and config fields between this stack's Transformer and Hugging Face LLaMA (stock or Mix-LN layout).

Weight names (per layer i, HF side under "model."):

    embed.weight                      model.embed_tokens.weight
    embed_scale.weight                model.embed_tokens.embed_scale   (--learnable-embedding-scale)
    layers.i.attn.{q,k,v,o}_proj      model.layers.i.self_attn.{q,k,v,o}_proj   (.weight, .bias)
    layers.i.mlp.{gate,up,down}_proj  model.layers.i.mlp.{gate,up,down}_proj   (.weight, .bias)
    layers.i.<norm>                   model.layers.i.<NORM_NAMES[family][norm]>   (by the layer's position)
    final_norm                        model.norm       (two-stream: final_norm.<n> -> model.norm.<n>)
    lm_head.weight                    lm_head.weight  (absent on the HF side when tied)
    lm_head.bias                      lm_head.bias    (--add-output-layer-bias: the custom class only)

HF's attention_bias puts a bias on q, k, v AND o, mlp_bias on gate, up, down: a model with
--add-qkv-bias only is exported with a zero o_proj bias (`zero_biases_for_hf`).

The norm names are the Mix-LN reference code's (`NORM_NAMES`), so a name alone does not fix a role:
`post_attention_layernorm` is the norm before the MLP in a pre layer but the norm after the attention
residual add in a post layer (docs/paper.md#the-naming-trap).
"""
from __future__ import annotations

import torch

from megatron_mixln.model.positions import deepnorm_alpha, lns_scale
from megatron_mixln.model.two_stream import FINAL_NORMS, layer_form

ATTN_LINEARS, MLP_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
PRE_LIKE, POST_LIKE = ("pre", "lns", "hybrid-first"), ("post", "deepnorm", "deeppost", "residual-dual")
NORM_NAMES = {
    "pre": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "post": {"attn_norm": "post_attention_layernorm", "mlp_norm": "post_feedforward_layernorm"},
    "peri": {"attn_norm": "input_layernorm", "attn_out_norm": "post_attention_layernorm",
             "mlp_norm": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm"},
    "siamese": {"attn_x_norm": "attn_x_layernorm", "attn_y_norm": "attn_y_layernorm", "attn_norm": "input_layernorm",
                "mlp_x_norm": "mlp_x_layernorm", "mlp_y_norm": "mlp_y_layernorm", "mlp_norm": "post_attention_layernorm"},
    "siamese-hybrid_pre": {"attn_y_norm": "attn_y_layernorm", "mlp_x_norm": "mlp_x_layernorm",
                           "mlp_y_norm": "mlp_y_layernorm", "mlp_norm": "post_attention_layernorm"},
    "hybrid": {"mlp_norm": "post_attention_layernorm"},  # HybridNorm's one residual-stream norm, after the attention add
}
SCALE_NAMES = {"siamese-hybrid_pre": {"attn_x_scale.weight": "attn_x_scale.weight"}}  # its c1
NORM_PARAMS = ("weight", "bias", "alpha", "shift")  # RMSNorm/LayerNorm: weight (bias); DyT/Derf add alpha (shift)
ALL_HF_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
                "attn_x_layernorm", "attn_y_layernorm", "mlp_x_layernorm", "mlp_y_layernorm")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer older transformers (and the reference code) saved


def family(position: str, siamese_variant: str = "post_pre") -> str:
    """The NORM_NAMES row of a position (residual-dual's two norms sit where post's do, and reordered's (OLMo 2)
    as Olmo2 names them; SiameseNorm's hybrid_pre has its own)."""
    if position in POST_LIKE + ("reordered",):
        return "post"
    return "pre" if position in PRE_LIKE else layer_form(position, siamese_variant)


def layer_name_map(position: str, siamese_variant: str = "post_pre") -> dict[str, str]:
    """Suffix map of one layer, ours -> HF (without the "layers.i." / "model.layers.i." prefixes)."""
    out = {f"attn.{p}.{w}": f"self_attn.{p}.{w}" for p in ATTN_LINEARS for w in ("weight", "bias")}
    out.update({f"mlp.{p}.{w}": f"mlp.{p}.{w}" for p in MLP_LINEARS for w in ("weight", "bias")})
    out.update({f"attn.{n}.{p}": f"self_attn.{n}.{p}" for n in ("q_norm", "k_norm", "v_norm") for p in NORM_PARAMS})
    for ours, hf in NORM_NAMES[family(position, siamese_variant)].items():
        out.update({f"{ours}.{p}": f"{hf}.{p}" for p in NORM_PARAMS})
    out.update(SCALE_NAMES.get(family(position, siamese_variant), {}))
    return out


def full_name_map(positions, final_norm: bool = True, tied: bool = False,
                  siamese_variant: str = "post_pre") -> dict[str, str]:
    """Every possible key ours -> HF for a model with these per-layer positions (biases included)."""
    out = {"embed.weight": "model.embed_tokens.weight", "embed_scale.weight": "model.embed_tokens.embed_scale"}
    for i, pos in enumerate(positions):
        out.update({f"layers.{i}.{k}": f"model.layers.{i}.{v}" for k, v in layer_name_map(pos, siamese_variant).items()})
    if final_norm:
        for sub in FINAL_NORMS.get(positions[0], ("",)):  # a two-stream model's final norms: model.norm.<sub>
            ours, hf = ("final_norm", "model.norm") if not sub else (f"final_norm.{sub}", f"model.norm.{sub}")
            out.update({f"{ours}.{p}": f"{hf}.{p}" for p in NORM_PARAMS})
    if not tied:
        out["lm_head.weight"] = "lm_head.weight"
    out["lm_head.bias"] = "lm_head.bias"
    return out


def hf_bias_flags(config) -> dict:
    """transformers' attention_bias (q, k, v, o) and mlp_bias (gate, up, down) for `config` (ModelConfig)."""
    return {"attention_bias": config.qkv_bias, "mlp_bias": config.add_bias_linear}


def zero_biases_for_hf(plain: dict, config) -> dict:
    """`plain` plus a zero bias for every linear that HF's attention_bias/mlp_bias gives one and `config` does
    not (o_proj with --add-qkv-bias only): exact, the HF linear then adds zero."""
    flags = hf_bias_flags(config)
    out = dict(plain)
    for i in range(config.num_layers):
        for sub, names, on in (("attn", ATTN_LINEARS, flags["attention_bias"]), ("mlp", MLP_LINEARS, flags["mlp_bias"])):
            for name in names if on else ():
                key, weight = f"layers.{i}.{sub}.{name}.bias", plain[f"layers.{i}.{sub}.{name}.weight"]
                if key not in out:
                    out[key] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return out



def to_hf_state_dict(plain: dict, config, fold_lns: bool = False) -> dict:
    """Our full state dict -> HF names (tied head dropped). Tensors are the same objects, except with
    `fold_lns` (export of lns layers to a stock Pre-LN class): an lns layer's norm gains are multiplied by
    its 1/sqrt(l), which is exact (RMSNorm(x)*g*s = RMSNorm(x)*(g*s); the final norm is not scaled)."""
    names = full_name_map(config.positions, config.final_norm, config.tie_embeddings, config.siamese_variant)
    out = {}
    for key, value in plain.items():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue
        if key not in names:
            raise ValueError(f"state dict: unexpected key {key!r} for positions {config.positions_str}")
        parts = key.split(".")
        if fold_lns and parts[0] == "layers" and parts[2] in ("attn_norm", "mlp_norm"):
            value = value * lns_scale(config.positions[int(parts[1])], int(parts[1]) + 1)
        out[names[key]] = value
    return out


def from_hf_state_dict(hf: dict, config, where: str) -> dict:
    """HF names -> our state dict for `config` (a ModelConfig); every expected tensor must be present
    with the shape the config implies, and no unknown tensor may remain. Errors name `where`."""
    from megatron_mixln.model import build_model

    expected = build_model(config, device="meta").state_dict()
    names = full_name_map(config.positions, config.final_norm, config.tie_embeddings, config.siamese_variant)
    inverse = {v: k for k, v in names.items()}
    out = {}
    for key, value in hf.items():
        if key.endswith(IGNORED_SUFFIXES) or (config.tie_embeddings and key == "lm_head.weight"):
            continue
        ours = inverse.get(key)
        if ours is not None and ours not in expected and ours.endswith("_proj.bias") and not value.any():
            continue  # a zero bias HF's attention_bias/mlp_bias forced on a linear the model has none on
        if ours is None or ours not in expected:
            raise ValueError(f"{where}: unexpected tensor {key!r} for a {config.normalization} model with "
                             f"positions {config.positions_str}")
        if tuple(value.shape) != tuple(expected[ours].shape):
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, the config implies "
                             f"{tuple(expected[ours].shape)}")
        out[ours] = value
    if config.tie_embeddings and "embed.weight" in out:
        out["lm_head.weight"] = out["embed.weight"]
    # HF's attention_bias/mlp_bias false (no such bias anywhere in the file): the model's biases there are zero
    hf_has = {sub: any(k.endswith(f".{p}.bias") for k in hf for p in linears)
              for sub, linears in (("attn", ATTN_LINEARS), ("mlp", MLP_LINEARS))}
    for key in expected:
        if key not in out and key.endswith("_proj.bias") and not hf_has[key.split(".")[2]]:
            out[key] = torch.zeros(expected[key].shape, dtype=out.get(key[:-4] + "weight", expected[key]).dtype)
    missing = [names.get(k, k) for k in expected if k not in out]
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    return out


def layer_norm_family(hf_keys, layer: int) -> frozenset:
    """The HF norm names layer `layer` has in a checkpoint (e.g. {'input_layernorm', 'post_attention_layernorm'})."""
    prefix = f"model.layers.{layer}."
    return frozenset(n for n in ALL_HF_NORMS if f"{prefix}{n}.weight" in hf_keys)


FAMILY_OF_NORMS = {frozenset(v.values()): k for k, v in NORM_NAMES.items()}


def per_layer_scales(config) -> tuple[list[float], list[float]]:
    """(residual scales a, output scales s) per layer, as the training stack's Block computes them."""
    L = config.num_layers
    return ([deepnorm_alpha(p, L) for p in config.positions],
            [lns_scale(p, i + 1) for i, p in enumerate(config.positions)])
