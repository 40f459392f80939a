"""Export a training checkpoint (any layout) as a Hugging Face model directory.

Output (all written under a temporary sibling, renamed at the end):
    config.json              LlamaConfig (all-pre RMSNorm) or MixLNLlamaConfig with auto_map
    generation_config.json   bos/eos/pad ids
    model*.safetensors       sharded above max_shard_size, with model.safetensors.index.json
    configuration_mixln_llama.py, modeling_mixln_llama.py   (custom models only; self-contained)
    tokenizer.model (+ tokenizer.json for BPE) + tokenizer_config.json (sentencepiece), or tokenizer.json passed
                             through; bos_token = the end-of-document token (see tokenizer_export.py)
    README.md                model card
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from megatron_mixln.checkpoint.reader import read_full_state_dict
from megatron_mixln.hf.hf_config import DTYPES, build_hf_config, stock_class, stock_refusal
from megatron_mixln.hf.mapping import to_hf_state_dict, zero_biases_for_hf
from megatron_mixln.hf.model_card import last_validation_ppl, model_card, training_summary
from megatron_mixln.fileio import check_output, staged_directory
from megatron_mixln.hf.remote_code import REMOTE_DIR, REMOTE_FILES
from megatron_mixln.hf.tokenizer_export import boundary_token, load_tokenizer, write_tokenizer

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _config_from_file(path: str):
    from megatron_mixln.model import ModelConfig

    try:
        with open(path) as f:
            return ModelConfig(**json.load(f))
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except (TypeError, ValueError) as e:  # an unknown field or value
        raise ValueError(f"--config {path}: {e}") from None


def _checked_model_config(plain: dict, config, where: str):
    """The state dict must be exactly the model the config describes (names and shapes)."""
    from megatron_mixln.model import build_model

    expected = build_model(config, device="meta").state_dict()
    for key, value in plain.items():
        if key not in expected:
            raise ValueError(f"{where}: tensor {key!r} does not belong to the recorded model "
                             f"(positions {config.positions_str}, {config.normalization})")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{where}: tensor {key} has shape {tuple(value.shape)}, the model config implies "
                             f"{tuple(expected[key].shape)}")
    missing = [k for k in expected if k not in plain]
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {', '.join(missing[:4])}")


def export_to_hf(checkpoint: str, output: str, tag: str | None = None, dtype: str | None = None,
                 max_shard_size: str | int = "5GB", tokenizer: str | None = None, always_custom: bool = False,
                 overwrite: bool = False, config_path: str | None = None, stock: bool = False) -> dict:
    """Write `output` from `checkpoint`; returns a summary dict. `stock`: refuse (ValueError naming --stock)
    unless a stock transformers class computes the model exactly. Raises ValueError/FileNotFoundError with a
    one-line message naming the file or field on bad input, before anything is written."""
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    check_output(output, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if isinstance(max_shard_size, str):
        from huggingface_hub.serialization._base import parse_size_to_int

        try:
            max_shard_size = parse_size_to_int(max_shard_size)
        except ValueError as e:
            raise ValueError(f"--max-shard-size {max_shard_size}: {e}") from None
    plain, config, meta, source = read_full_state_dict(checkpoint, tag)
    if config_path:
        config = _config_from_file(config_path)
    if config is None:
        raise ValueError(f"{checkpoint}: no model config (neither config.json nor the trainer's "
                         "client_state['mixln']['model_config']); pass --config FILE")
    _checked_model_config(plain, config, checkpoint)
    stock_name = stock_class(config)  # None: the custom modeling file (every position and norm-zoo option)
    if stock and (stock_name is None or always_custom):
        raise ValueError(stock_refusal(config, always_custom))
    summary = training_summary(meta)
    tok_spec = tokenizer or (summary.get("training_config") or {}).get("tokenizer")
    tok, ids = (None, {}) if not tok_spec or tok_spec.startswith("null:") else load_tokenizer(
        tok_spec, config.vocab_size, "--tokenizer" if tokenizer else f"{checkpoint} (training_config.tokenizer)")
    stored = {v: k for k, v in TORCH_DTYPES.items()}.get(plain["embed.weight"].dtype, "fp32")
    dtype = dtype or stored
    custom = always_custom or stock_name is None
    hf_config = build_hf_config(config, dtype, ids, tok.vocab_size if tok else None, custom, stock_name or "")
    training = summary.get("training_config") or {}
    ppl = last_validation_ppl(training.get("run_dir") or training.get("save") or checkpoint, summary.get("iteration"))

    with staged_directory(output) as tmp:
        # The tokenizer first, checked as AutoTokenizer loads it beside this config: some stock model types
        # (qwen2, olmo2, stablelm) rebuild their own tokenizer, and then the custom modeling file keeps it exact.
        tok_files, tok_class, tokenizer_note = [], None, None
        if tok is not None:
            try:
                tok_files, tok_class = write_tokenizer(tok, tmp, config.seq_length, None if custom else hf_config)
            except ValueError as e:
                if custom:
                    raise
                if stock:
                    raise ValueError(f"--stock: {stock_name} would load another tokenizer than the training one "
                                     f"({e}); drop --stock (the custom modeling file keeps the tokenizer exact)") from None
                tokenizer_note = (f"{stock_name} holds the weights exactly, but AutoTokenizer would not give the "
                                  f"training ids for it ({e}): exported with the custom modeling file instead")
                custom = True
                hf_config = build_hf_config(config, dtype, ids, tok.vocab_size, custom, "")
                tok_files, tok_class = write_tokenizer(tok, tmp, config.seq_length, None)
        if custom or stock_name == "LlamaForCausalLM":  # HF's attention_bias also biases o_proj: a zero one, if needed
            plain = zero_biases_for_hf(plain, config)
        hf_plain = to_hf_state_dict(plain, config, fold_lns=not custom)  # lns -> stock Llama: 1/sqrt(l) into gains
        tensors = {k: v.detach().to(TORCH_DTYPES[dtype]).contiguous() for k, v in hf_plain.items()}
        hf_config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"),
                         pad_token_id=ids.get("pad")).save_pretrained(tmp)
        save_torch_state_dict(tensors, tmp, max_shard_size=max_shard_size, safe_serialization=True,
                              metadata={"format": "pt"})
        if custom:
            for name in REMOTE_FILES:
                shutil.copyfile(os.path.join(REMOTE_DIR, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(config, summary, hf_config.architectures[0], custom, ppl, os.path.abspath(checkpoint),
                               dtype, boundary_token(tok) if tok else None))
        files = sorted(os.listdir(tmp))
    return {"output": output, "source": source, "class": hf_config.architectures[0], "custom_code": custom,
            "dtype": dtype, "positions": config.positions_str, "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values()), "tokenizer": tok_files, "tokenizer_class": tok_class,
            "document_boundary_id": ids.get("bos"), "files": files,
            **({"note": tokenizer_note} if tokenizer_note else {})}
