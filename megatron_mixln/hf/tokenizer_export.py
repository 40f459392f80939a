"""The training tokenizer as a transformers tokenizer: sentencepiece -> tokenizer.model + LlamaTokenizer; tokenizer.json passed through.

Documents were tokenized without BOS/EOS (Megatron style, the end-of-document id appended by the
preprocessor), so the exported tokenizer adds no special tokens either (add_bos_token=False).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from megatron_mixln.data.tokenizer import HFTokenizer, SentencePieceTokenizer, build_tokenizer


def special_ids(tok) -> dict:
    """bos/eos/pad/unk ids of one of our tokenizers (None when absent)."""
    ids = {"bos": tok.bos, "eos": tok.eod, "pad": tok.pad, "unk": None}
    if isinstance(tok, SentencePieceTokenizer):
        unk = tok._sp.unk_id()
        ids["unk"] = unk if 0 <= unk < tok.vocab_size else None
    return ids


def load_tokenizer(spec: str, model_vocab: int, where: str):
    """Build and check a tokenizer: it must fit the model's (padded) vocabulary. Returns (tokenizer, special ids)."""
    from megatron_mixln.data.errors import TokenizerError

    try:
        tok = build_tokenizer(spec)
    except TokenizerError as e:
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(tok, (SentencePieceTokenizer, HFTokenizer)):
        raise ValueError(f"{where}: {spec!r} cannot be exported (only a sentencepiece .model or a tokenizer.json)")
    if tok.vocab_size > model_vocab:
        raise ValueError(f"{where}: tokenizer {spec} has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{model_vocab} (ids past {model_vocab - 1} would index past the embedding)")
    return tok, special_ids(tok)


def write_tokenizer(tok, out_dir: str, max_length: int) -> list[str]:
    """Write the tokenizer files into out_dir; returns their names."""
    from transformers import AutoTokenizer

    if isinstance(tok, HFTokenizer):
        shutil.copyfile(tok.path, os.path.join(out_dir, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                  "add_bos_token": False, "add_eos_token": False}
        for name, tid in (("bos_token", tok.bos), ("eos_token", tok.eod), ("pad_token", tok.pad)):
            if tid is not None:
                config[name] = tok._tok.id_to_token(tid)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        return ["tokenizer.json", "tokenizer_config.json"]
    sp = tok._sp
    ids = special_ids(tok)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
              "model_max_length": max_length, "legacy": False}
    for name, key in (("bos", "bos_token"), ("eos", "eos_token"), ("pad", "pad_token"), ("unk", "unk_token")):
        if ids[name] is not None:
            config[key] = sp.IdToPiece(ids[name])
    with tempfile.TemporaryDirectory(dir=out_dir) as stage:  # transformers converts tokenizer.model -> tokenizer.json
        shutil.copyfile(tok.model_path, os.path.join(stage, "tokenizer.model"))
        with open(os.path.join(stage, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        hf_tok = AutoTokenizer.from_pretrained(stage)
        for name, want in ids.items():
            got = getattr(hf_tok, f"{name}_token_id")
            if want is not None and got != want:
                raise ValueError(f"{tok.model_path}: transformers maps {name} to id {got}, sentencepiece to {want}")
        hf_tok.save_pretrained(out_dir)
    shutil.copyfile(tok.model_path, os.path.join(out_dir, "tokenizer.model"))
    return sorted(n for n in os.listdir(out_dir) if n.startswith(("tokenizer", "special_tokens")))
