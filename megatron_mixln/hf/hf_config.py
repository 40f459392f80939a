"""ModelConfig <-> the transformers config (stock LlamaConfig or the exported MixLNLlamaConfig)."""
from __future__ import annotations

import json
import os

from megatron_mixln.hf.mapping import hf_bias_flags, per_layer_scales
from megatron_mixln.model.positions import format_positions

AUTO_MAP = {
    "AutoConfig": "configuration_mixln_llama.MixLNLlamaConfig",
    "AutoModel": "modeling_mixln_llama.MixLNLlamaModel",
    "AutoModelForCausalLM": "modeling_mixln_llama.MixLNLlamaForCausalLM",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Stock transformers families this stack computes (docs/norm-zoo.md, docs/model.md): model_type -> ModelConfig fields.
STOCK_ZOO = {"olmo2": dict(norm_position="reordered", qk_norm="full"), "qwen3": dict(norm_position="pre", qk_norm="head"),
             "stablelm": dict(norm_position="pre", normalization="LayerNorm"),
             "qwen2": dict(norm_position="pre", add_qkv_bias=True)}
# Stock fields that must hold these values for the class to be this stack's model.
STOCK_REQUIRES = {"stablelm": dict(use_qkv_bias=False, qk_layernorm=False, use_parallel_residual=False)}


def stock_class(config) -> str | None:
    """The transformers class that computes `config` (ModelConfig) exactly without remote code, or None:
    pre (and lns, whose 1/sqrt(l) folds into the gains) -> LlamaForCausalLM; pre + --qk-norm head ->
    Qwen3ForCausalLM; reordered + --qk-norm full -> Olmo2ForCausalLM (RMSNorm, a final norm, shared QK gains);
    pre/lns with LayerNorm -> StableLmForCausalLM (sequential Pre-LN LayerNorm, SwiGLU, full rotary). Linear
    biases, pre/lns RMSNorm only: --add-qkv-bias -> Qwen2ForCausalLM (q/k/v biases), --add-bias-linear ->
    LlamaForCausalLM with attention_bias and mlp_bias; an LM-head bias (--add-output-layer-bias): no stock class."""
    if (not config.final_norm or getattr(config, "gated_layers", ()) or getattr(config, "qk_norm_per_head_gain", False)
            or getattr(config, "learnable_embedding_scale", False)):  # no stock class scales the embedding by a weight
        return None
    if config.add_output_layer_bias:  # no stock causal-LM class has an LM-head bias
        return None
    positions, qk = set(config.positions), getattr(config, "qk_norm", "none")
    if config.qkv_bias:  # q/k/v biases only: Qwen2; every linear: Llama's attention_bias + mlp_bias
        if not (positions <= {"pre", "lns"} and qk == "none" and config.normalization == "RMSNorm"):
            return None
        return "LlamaForCausalLM" if config.add_bias_linear else "Qwen2ForCausalLM"
    if config.normalization == "LayerNorm":
        return "StableLmForCausalLM" if positions <= {"pre", "lns"} and qk == "none" else None
    if config.normalization != "RMSNorm":
        return None
    if positions <= {"pre", "lns"} and qk == "none":
        return "LlamaForCausalLM"
    if positions == {"pre"} and qk == "head":
        return "Qwen3ForCausalLM"
    if positions == {"reordered"} and qk == "full":
        return "Olmo2ForCausalLM"
    return None


def stock_refusal(config, always_custom: bool = False) -> str:
    """The one-line reason `tools/convert_to_hf.py --stock` refuses `config` (ModelConfig)."""
    if always_custom:
        return "--stock: conflicts with --always-custom; give one of them"
    # options that no stock class holds, whatever the positions: name the flag
    for flag, on, what in (("--add-output-layer-bias", config.add_output_layer_bias, "an LM-head bias"),
                           ("--learnable-embedding-scale", getattr(config, "learnable_embedding_scale", False),
                            "a learnable embedding scale"),
                           ("--qk-norm-per-head-gain", getattr(config, "qk_norm_per_head_gain", False),
                            "per-head QK-norm gains"),
                           ("--no-final-norm", not config.final_norm, "a model without a final norm"),
                           ("--residual-gate-layers", bool(getattr(config, "gated_layers", ())), "residual gates")):
        if on:
            return (f"--stock: {flag}: no stock transformers class has {what}; drop --stock (the custom modeling "
                    "file computes it)")
    if config.qkv_bias:
        flag = "--add-bias-linear" if config.add_bias_linear else "--add-qkv-bias"
        return (f"--stock: {flag}: linear biases have a stock class (Llama, Qwen2) only with RMSNorm pre/lns layers "
                f"and no QK-norm, not positions {config.positions_str}, --normalization {config.normalization}, "
                f"--qk-norm {config.qk_norm}; drop --stock (the custom modeling file computes it)")
    return (f"--stock: no stock transformers class computes this model exactly (positions {config.positions_str}, "
            f"--normalization {config.normalization}, --qk-norm {config.qk_norm}); drop --stock for the custom "
            "modeling file (docs/huggingface.md lists the stock rows)")


def build_hf_config(config, dtype: str, special_ids: dict, real_vocab_size: int | None, custom: bool,
                    stock: str = "LlamaForCausalLM"):
    """A transformers config object for `config` (ModelConfig). special_ids: bos/eos/pad token ids or None.

    Raises ValueError for a model with learnable residual gates (--residual-gate-layers): the exported
    modeling code has no gates, and dropping them would change the model."""
    if getattr(config, "gated_layers", ()):
        raise ValueError(f"residual_gate_layers {config.residual_gate_layers!r}: models with learnable residual "
                         "gates cannot be exported (the Hugging Face modeling code has no gates)")
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.seq_length, rms_norm_eps=config.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_base)},
        tie_word_embeddings=config.tie_embeddings, initializer_range=config.init_method_std,
        **hf_bias_flags(config),
        bos_token_id=special_ids.get("bos"), eos_token_id=special_ids.get("eos"), pad_token_id=special_ids.get("pad"),
    )
    if not custom and stock == "Olmo2ForCausalLM":
        from transformers import Olmo2Config

        common = {k: v for k, v in common.items() if k not in ("head_dim", "mlp_bias")}  # Olmo2: head_dim = h/heads
        hf = Olmo2Config(**common, mixln_model_config=config.to_dict())
        hf.architectures = [stock]
    elif not custom and stock == "StableLmForCausalLM":
        from transformers import StableLmConfig

        common = {k: v for k, v in common.items() if k not in ("head_dim", "mlp_bias", "attention_bias", "rms_norm_eps")}
        common["rope_parameters"] = {**common["rope_parameters"], "partial_rotary_factor": 1.0}
        recorded = config.replace(norm_position="pre") if "lns" in config.positions else config  # lns folded
        hf = StableLmConfig(**common, layer_norm_eps=config.norm_epsilon, use_qkv_bias=False, qk_layernorm=False,
                            use_parallel_residual=False, mixln_model_config=recorded.to_dict())
        hf.architectures = [stock]
    elif not custom and stock == "Qwen2ForCausalLM":
        from transformers import Qwen2Config

        common = {k: v for k, v in common.items() if k not in ("head_dim", "mlp_bias", "attention_bias")}
        recorded = config.replace(norm_position="pre") if "lns" in config.positions else config  # lns folded
        hf = Qwen2Config(**common, use_sliding_window=False, mixln_model_config=recorded.to_dict())
        hf.architectures = [stock]
    elif not custom and stock == "Qwen3ForCausalLM":
        from transformers import Qwen3Config

        common = {k: v for k, v in common.items() if k != "mlp_bias"}
        hf = Qwen3Config(**common, use_sliding_window=False, mixln_model_config=config.to_dict())
        hf.architectures = [stock]
    elif not custom:
        from transformers import LlamaConfig

        # lns layers are exported with 1/sqrt(l) folded into their gains: what the file holds is a pre model
        recorded = config.replace(norm_position="pre") if "lns" in config.positions else config
        hf = LlamaConfig(**common, mixln_model_config=recorded.to_dict())  # extra field: kept, ignored by transformers
        hf.architectures = ["LlamaForCausalLM"]
    else:
        from megatron_mixln.hf.remote.configuration_mixln_llama import MixLNLlamaConfig

        residual, output = per_layer_scales(config)
        hf = MixLNLlamaConfig(
            **common, norm_positions=list(config.positions), residual_scales=residual, output_scales=output,
            layer_numbers=list(range(1, config.num_layers + 1)), normalization=config.normalization,
            final_norm=config.final_norm, lm_head_bias=config.add_output_layer_bias,
            real_vocab_size=real_vocab_size, siamese_variant=config.siamese_variant,
            mixln_model_config=config.to_dict(),
            qk_norm=config.qk_norm, qk_norm_per_head_gain=config.qk_norm_per_head_gain,
            hybrid_ffn_residual_after_norm=config.hybrid_ffn_residual_after_norm, dyt_bias=config.dyt_bias,
            learnable_embedding_scale=config.learnable_embedding_scale)
        hf.architectures = ["MixLNLlamaForCausalLM"]
        hf.auto_map = dict(AUTO_MAP)
    hf.dtype = DTYPES[dtype]
    return hf


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing (an HF model directory has a config.json)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def model_config_from_hf(cfg: dict, path: str, norm_position: str | None, post_ln_layers: int | None):
    """A ModelConfig from an HF LLaMA config.json dict. Our own export carries the full ModelConfig
    (mixln_model_config) and is used verbatim; otherwise the LlamaConfig fields are mapped.
    Raises ValueError naming `path` and the field for anything that is not LLaMA-shaped."""
    from megatron_mixln.model import ModelConfig

    where = os.path.join(path, "config.json")
    archs = cfg.get("architectures") or []
    zoo = STOCK_ZOO.get(cfg.get("model_type"), {})  # Olmo2 / Qwen3 / StableLM / Qwen2: fields they fix
    if not zoo and cfg.get("model_type") not in ("llama", "mixln_llama") and "LlamaForCausalLM" not in archs:
        raise ValueError(f"{where}: model_type {cfg.get('model_type')!r} is not LLaMA-shaped "
                         f"(expected 'llama', 'mixln_llama', {', '.join(repr(k) for k in STOCK_ZOO)})")
    if zoo and norm_position is not None:
        raise ValueError(f"{where}: model_type {cfg.get('model_type')!r} fixes the norm position "
                         f"({zoo['norm_position']}); drop --norm-position")
    for field, want in STOCK_REQUIRES.get(cfg.get("model_type"), {}).items():
        if cfg.get(field, want) != want:
            raise ValueError(f"{where}: {field} is {cfg.get(field)!r}; only {want!r} is supported here")
    if zoo and float((cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor must be 1.0 (RoPE on the whole head) here")
    if cfg.get("use_sliding_window") or (cfg.get("model_type") == "qwen3" and cfg.get("sliding_window")
                                         and cfg.get("use_sliding_window") is not False):
        raise ValueError(f"{where}: use_sliding_window is set; only full causal attention is supported here")
    biased = {f: bool(cfg.get(f)) for f in ("attention_bias", "mlp_bias")}
    for field, want in (("hidden_act", "silu"),) + (tuple((f, False) for f in biased) if zoo else ()):
        if cfg.get(field, want) != want:
            raise ValueError(f"{where}: {field} is {cfg.get(field)!r}; only {want!r} is LLaMA-shaped here")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise ValueError(f"{where}: rope scaling {scaling!r} is not supported (plain RoPE only)")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(cfg.get(field), int):
            raise ValueError(f"{where}: {field} missing or not an integer")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise ValueError(f"{where}: head_dim {head_dim} x num_attention_heads != hidden_size (not supported)")
    saved = cfg.get("mixln_model_config")
    L = cfg["num_hidden_layers"]
    if zoo and not isinstance(saved, dict):
        norm_position, post_ln_layers = zoo["norm_position"], None
    saved_positions = cfg.get("norm_positions")
    if norm_position is not None and saved_positions is not None:
        from megatron_mixln.model.positions import resolve_positions

        wanted = resolve_positions(norm_position, L, post_ln_layers)
        if list(wanted) != list(saved_positions):
            raise ValueError(f"{where}: norm_positions is {format_positions(saved_positions)!r} but --norm-position "
                             f"gives {format_positions(wanted)!r}; drop --norm-position or fix it")
    if isinstance(saved, dict):
        try:
            config = ModelConfig(**saved)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: mixln_model_config: {e}") from None
        recorded = list(saved_positions) if saved_positions is not None else ["pre"] * L
        if list(config.positions) != recorded or config.num_layers != L:
            raise ValueError(f"{where}: mixln_model_config (positions {config.positions_str}, {config.num_layers} "
                             f"layers) disagrees with norm_positions/num_hidden_layers ({format_positions(recorded)})")
        return config
    if saved_positions is not None:
        norm_position, post_ln_layers = format_positions(saved_positions), None
    elif norm_position is not None:
        from megatron_mixln.model.positions import TWO_STREAM, resolve_positions

        if resolve_positions(norm_position, L, post_ln_layers)[0] in TWO_STREAM:
            raise ValueError(f"--norm-position {norm_position}: {where} is a stock one-stream LLaMA layout; a "
                             "two-stream model (siamese, residual-dual) loads only from this project's own export")
    try:
        return ModelConfig(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["intermediate_size"],
            num_layers=L, num_attention_heads=cfg["num_attention_heads"],
            num_query_groups=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            seq_length=int(cfg.get("max_position_embeddings") or 2048),
            rotary_base=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            normalization=zoo.get("normalization", cfg.get("normalization", "RMSNorm")),
            norm_epsilon=float(cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", 1e-6))),
            norm_position=norm_position or "pre", post_ln_layers=post_ln_layers,
            final_norm=bool(cfg.get("final_norm", True)),
            qk_norm=zoo.get("qk_norm", "none"), add_qkv_bias=zoo.get("add_qkv_bias", False),
            # HF's attention_bias is q/k/v/o, mlp_bias gate/up/down: --add-bias-linear holds either exactly (the
            # linears HF has no bias on get zero ones, see mapping.from_hf_state_dict)
            add_bias_linear=biased["attention_bias"] or biased["mlp_bias"],
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            init_method_std=float(cfg.get("initializer_range", 0.02)),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
