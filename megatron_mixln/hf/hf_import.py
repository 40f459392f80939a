"""Import an HF LLaMA directory (stock, the Mix-LN reference code's layout, or our own export) as a
checkpoint `pretrain --load` accepts: DeepSpeed layout for a TP x PP run, marked converted (fresh
optimizer), with the trainer's mixln_meta.json and client state; iteration as given (default 0).
The directory's tokenizer files are copied bit for bit into <output>/tokenizer (pass it as --tokenizer;
the checkpoint records it, so exporting the import again ships the same tokenizer).

Norm positions: from config.json's norm_positions (our export), else from --norm-position (the reference
code's NORM_TYPE/POST_NUM: NORM_TYPE=post_pre POST_NUM=k is `mix --post-ln-layers k` or `post*k,pre*...`),
else all pre. Each layer's norm names must agree with its position (docs/paper.md#the-naming-trap: a reference
post layer has post_attention_layernorm + post_feedforward_layernorm, a pre layer input_layernorm +
post_attention_layernorm), checked before anything is written.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict

from megatron_mixln.checkpoint.layout import META, tag_for
from megatron_mixln.checkpoint.meta import CLIENT_KEY, CheckpointMeta, TrainState, client_state
from megatron_mixln.hf.hf_config import model_config_from_hf, read_hf_config
from megatron_mixln.hf.hf_weights import check_weight_files, load_weights, weight_files
from megatron_mixln.hf.mapping import FAMILY_OF_NORMS, family, from_hf_state_dict, layer_norm_family
from megatron_mixln.fileio import check_output, staged_directory


def check_norm_layout(keys, config, where: str, position_given: bool) -> None:
    """Every layer's norm names must be those of its position's family (pre-like, post-like, peri)."""
    for i, pos in enumerate(config.positions):
        found = layer_norm_family(keys, i)
        found_family = FAMILY_OF_NORMS.get(found)
        if found_family != family(pos, config.siamese_variant):
            hint = ("" if position_given else "; pass --norm-position (for the Mix-LN reference code: "
                    "'mix --post-ln-layers POST_NUM' for NORM_TYPE=post_pre, 'post', 'deeppost', 'sandwich')")
            raise ValueError(f"{where}: layer {i} has norms {sorted(found) or 'none'} "
                             f"({found_family or 'unknown layout'}) but its position is {pos!r}{hint}")


def read_hf_model(hf_dir: str, norm_position: str | None = None, post_ln_layers: int | None = None):
    """-> (our full state dict, ModelConfig). Raises ValueError naming the file/field on bad input."""
    if not os.path.isdir(hf_dir):
        raise ValueError(f"--hf {hf_dir}: no such directory")
    cfg = read_hf_config(hf_dir)
    try:
        config = model_config_from_hf(cfg, hf_dir, norm_position, post_ln_layers)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if hf_dir in msg else f"{hf_dir}/config.json: {msg}") from None
    files = weight_files(hf_dir)
    check_weight_files(files)
    hf = load_weights(files)
    where = f"{hf_dir} (weights)"
    check_norm_layout(set(hf), config, where, norm_position is not None or "norm_positions" in cfg)
    if config.add_qkv_bias and not config.add_bias_linear and any(
            k.endswith("o_proj.bias") and bool(v.any()) for k, v in hf.items()):
        # our --add-qkv-bias export carries HF's attention_bias, whose zero o_proj bias trains in transformers:
        # after fine-tuning it is a real bias, held exactly by --add-bias-linear (zero gate/up/down biases)
        config = config.replace(add_bias_linear=True)
    return from_hf_state_dict(hf, config, where), config


TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "spiece", "sentencepiece", "vocab.",
                      "merges.txt", "chat_template")


def tokenizer_files(hf_dir: str) -> list[str]:
    """Names of the tokenizer files of an HF directory (tokenizer.json/.model/_config.json, spiece.model, ...)."""
    return sorted(n for n in os.listdir(hf_dir) if n.startswith(TOKENIZER_PREFIXES)
                  and os.path.isfile(os.path.join(hf_dir, n)))


def import_from_hf(hf_dir: str, output: str, norm_position: str | None = None, post_ln_layers: int | None = None,
                   iteration: int = 0, tp: int = 1, pp: int = 1, seed: int = 1234, overwrite: bool = False) -> dict:
    """Write a DeepSpeed checkpoint of the HF model into `output` (staged, renamed at the end)."""
    from megatron_mixln.checkpoint.convert import SIDECARS, write_deepspeed_checkpoint

    check_output(output, overwrite)
    if iteration < 0:
        raise ValueError(f"--iteration {iteration}: must be >= 0")
    plain, config = read_hf_model(hf_dir, norm_position, post_ln_layers)
    tok_names = tokenizer_files(hf_dir)
    tok_dir = os.path.join(os.path.abspath(output), "tokenizer") if tok_names else None
    training = {"seed": seed, **({"tokenizer": tok_dir} if tok_dir else {})}
    tag = tag_for(iteration)
    train_state = TrainState(iteration=iteration)
    meta = CheckpointMeta(tag=tag, train_state=asdict(train_state), model_config=config.to_dict(), world_size=tp * pp,
                          data_parallel_size=1, zero_stage=0, bf16=None, tensor_model_parallel_size=tp,
                          pipeline_model_parallel_size=pp, imported_from=os.path.abspath(hf_dir))
    metadata = {CLIENT_KEY: client_state(train_state, config.to_dict(), training, []),
                "global_steps": iteration, SIDECARS: {META: meta.to_json()}}
    with staged_directory(output) as tmp:
        write_deepspeed_checkpoint(plain, tmp, tag, tp, pp, "pipeline" if pp > 1 else "plain", metadata, config)
        if tok_names:
            os.makedirs(os.path.join(tmp, "tokenizer"))
            for name in tok_names:
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, "tokenizer", name))
    return {"output": output, "tag": tag, "positions": config.positions_str, "tensors": len(plain),
            "parameters": sum(v.numel() for k, v in plain.items() if not (config.tie_embeddings and k == "lm_head.weight")),
            "model_config": config.to_dict(), "tokenizer": tok_dir}
