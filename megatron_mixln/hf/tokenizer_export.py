"""The training tokenizer as a transformers tokenizer that gives exactly the ids the preprocessor wrote.

* sentencepiece ``.model`` (what ``preprocess_c4.py`` encoded with ``sentencepiece.encode``): the model
  file is shipped as ``tokenizer.model`` and, by default, served by transformers'
  ``SentencePieceBackend`` (sentencepiece itself encodes). Only a BPE model with the identity
  normalisation rule (LLaMA's kind) gets a ``tokenizer.json`` that reproduces sentencepiece
  (``spm_tokenizer_json``, which says why the others cannot), made the default
  (``PreTrainedTokenizerFast``) once it encoded the probe strings below exactly as sentencepiece.
* ``tokenizer.json``: copied bit for bit (without a post-processor that would add a BOS/EOS the
  pipeline never wrote); the config keeps tokenizers' matching of special tokens in text.

Special tokens are never matched in the text of a sentencepiece export (``split_special_tokens``):
sentencepiece encodes the text ``"<s>"`` as text. Nothing is added around a text (no BOS/EOS), as the
preprocessor wrote documents.

Document boundary: the preprocessor separates documents by the end-of-document id (``--append-eod``)
and never writes a BOS, so the model only ever saw a document start right after EOD. The export
declares ``bos_token`` = the EOD token (GPT-2's convention); lm-eval's ``HFLM.prefix_token_id`` (the
token a rolling log-likelihood or an empty context is conditioned on) is then the EOD id.
"""
from __future__ import annotations

import json
import os
import shutil

from megatron_mixln.data.tokenizer import HFTokenizer, SentencePieceTokenizer, build_tokenizer

# Strings an export must encode as the training tokenizer does, checked before it is written.
PROBE_TEXTS = [
    "", " ", "   ", "\t", "\n", "\r\n", " \t\n ", "a  b", "x\ny", "tab\tx", "a\r\nb", "  lead", "trail  ",
    " both ", "\ufb01", "\ufb01ne", "\uff21\uff22\uff23\uff11\uff12\uff13", "e\u0301", "\u00bd \u00a8 \u2122",
    "\u00a0x\u3000y", "\U0001f600", "\U0001f600\U0001f600 x \U0001f600", "\u2581", "a \u2581b", "\x00\x01a",
    "<s>", "</s>", "<unk>", "<pad>", " <s> hi", "x</s>y", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "Return the number of items in a container. \u00dcn\u00efc\u00f6d\u00e9 too.", "0000000 1.00000004 -10",
    "the\ufb02\u0301", "\u2581\u2581\u0301x", "\uff21\u0301",
]


def boundary_id(tok) -> int | None:
    """The id the model saw right before every document: EOD (the preprocessor never writes BOS);
    the tokenizer's BOS only when it has no EOD."""
    return tok.eod if tok.eod is not None else tok.bos


def boundary_token(tok) -> tuple[int, str] | None:
    """(id, token string) of the document boundary, None when the tokenizer has neither EOD nor BOS."""
    tid = boundary_id(tok)
    if tid is None:
        return None
    return tid, tok._sp.IdToPiece(tid) if isinstance(tok, SentencePieceTokenizer) else tok._tok.id_to_token(tid)


def special_ids(tok) -> dict:
    """bos/eos/pad/unk ids an export declares (None when absent); bos is the document boundary."""
    ids = {"bos": boundary_id(tok), "eos": tok.eod, "pad": tok.pad, "unk": None}
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


def _spm_probe_texts(sp) -> list[str]:
    """PROBE_TEXTS plus every piece's surface alone, after a space and glued to the next piece."""
    surfaces = [sp.IdToPiece(i).replace("\u2581", " ") for i in range(sp.GetPieceSize())]
    return PROBE_TEXTS + surfaces + [" " + s for s in surfaces] + [a + b for a, b in zip(surfaces, surfaces[1:])]


def _first_difference(hf_tok, reference, texts: list[str]):
    """(text, reference ids, transformers ids) of the first text `hf_tok` encodes differently, or None.
    `hf_tok` is called as lm-eval and users call it (default add_special_tokens)."""
    want = reference(texts)
    got = hf_tok(texts)["input_ids"]
    for text, w, g in zip(texts, want, got):
        if list(w) != list(g):
            return text, list(w), list(g)
    return None


def _write_config(out_dir: str, config: dict) -> None:
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def _load(out_dir: str, model_config=None):
    """AutoTokenizer on the directory, as users and lm-eval load it next to `model_config` (the export's
    transformers config: for some model types -- qwen2, olmo2, stablelm, ... -- AutoTokenizer ignores
    tokenizer_config.json's class and builds its own). None (the custom model type) passes an empty config:
    config.json names this project's model type, which AutoConfig would offer to run (an interactive
    prompt) before falling back to tokenizer_config.json's class, as this does."""
    from transformers import AutoTokenizer, PretrainedConfig

    return AutoTokenizer.from_pretrained(out_dir, config=PretrainedConfig() if model_config is None else model_config)


def _loaded_as(hf_tok, model_config) -> str:
    """"Qwen2Tokenizer (AutoTokenizer for model type qwen2)": the class a difference came from."""
    kind = type(hf_tok).__name__
    return kind if model_config is None else f"{kind} (AutoTokenizer for model type {model_config.model_type})"


def _check_loaded(hf_tok, ids: dict, where: str) -> None:
    for name, want in ids.items():
        got = getattr(hf_tok, f"{name}_token_id")
        if want is not None and got != want:
            raise ValueError(f"{where}: transformers maps {name} to id {got}, the training tokenizer to {want}")


# A decoder-only model continues the last token of each row: a batch for generate() is padded on the
# left (transformers warns about right padding). lm-eval sets the side itself; training never pads here.
PADDING_SIDE = "left"


def _write_spm(tok: SentencePieceTokenizer, out_dir: str, max_length: int, model_config=None) -> str:
    """tokenizer.model (+ tokenizer.json for BPE when exact) + tokenizer_config.json; returns the class."""
    from megatron_mixln.hf.spm_tokenizer_json import spm_tokenizer_json

    sp, ids = tok._sp, special_ids(tok)
    with open(tok.model_path, "rb") as f:
        model_bytes = f.read()
    shutil.copyfile(tok.model_path, os.path.join(out_dir, "tokenizer.model"))
    config = {"model_max_length": max_length, "add_bos_token": False, "add_eos_token": False, "legacy": True,
              "split_special_tokens": True, "clean_up_tokenization_spaces": False, "padding_side": PADDING_SIDE}
    for name, key in (("bos", "bos_token"), ("eos", "eos_token"), ("pad", "pad_token"), ("unk", "unk_token")):
        if ids[name] is not None:
            config[key] = sp.IdToPiece(ids[name])
    texts, reference = _spm_probe_texts(sp), tok.encode_batch
    try:
        fast = spm_tokenizer_json(model_bytes)
    except ValueError:
        fast = None  # unigram, nmt_nfkc, ...: tokenizers cannot reproduce it, sentencepiece serves it
    if fast is not None:
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(fast)
        _write_config(out_dir, {"tokenizer_class": "PreTrainedTokenizerFast", **config})
        hf_tok = _load(out_dir, model_config)
        if _first_difference(hf_tok, reference, texts) is None:
            _check_loaded(hf_tok, ids, tok.model_path)
            return "PreTrainedTokenizerFast"
        os.remove(os.path.join(out_dir, "tokenizer.json"))  # not proven equal: sentencepiece serves it
    _write_config(out_dir, {"tokenizer_class": "SentencePieceBackend", **config})
    hf_tok = _load(out_dir, model_config)
    diff = _first_difference(hf_tok, reference, texts)
    if diff is not None:
        raise ValueError(f"{tok.model_path}: transformers' {_loaded_as(hf_tok, model_config)} encodes {diff[0]!r} "
                         f"as {diff[2]}, sentencepiece as {diff[1]}")
    _check_loaded(hf_tok, ids, tok.model_path)
    return "SentencePieceBackend"


def _write_hf_json(tok: HFTokenizer, out_dir: str, max_length: int, model_config=None) -> str:
    """tokenizer.json + a tokenizer_config.json keeping the pipeline's behaviour: special tokens matched in
    text as `tokenizers.Tokenizer.encode` matches them, nothing added around a text. The file is copied
    bit for bit, unless its post-processor adds tokens (a BOS template): the preprocessor encoded with
    add_special_tokens=False, and transformers 5 takes the template from tokenizer.json whatever
    add_bos_token says, so that copy has "post_processor": null and is otherwise the same JSON."""
    dest = os.path.join(out_dir, "tokenizer.json")
    post = tok._tok.post_processor
    if post is not None and post.num_special_tokens_to_add(False) > 0:
        with open(tok.path, encoding="utf-8") as f:
            data = json.load(f)
        data["post_processor"] = None
        with open(dest, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
    else:
        shutil.copyfile(tok.path, dest)
    ids = special_ids(tok)
    # transformers registers bos/eos/pad as special tokens matched in text; tokenizers matches only the
    # file's added tokens: with no special one there (e.g. spm_tokenizer_json's), nothing may be matched
    matches_specials = any(t.special for t in tok._tok.get_added_tokens_decoder().values())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "add_bos_token": False, "add_eos_token": False, "split_special_tokens": not matches_specials,
              "clean_up_tokenization_spaces": False, "padding_side": PADDING_SIDE}
    for name, key in (("bos", "bos_token"), ("eos", "eos_token"), ("pad", "pad_token")):
        if ids[name] is not None:
            config[key] = tok._tok.id_to_token(ids[name])
    _write_config(out_dir, config)
    hf_tok = _load(out_dir, model_config)
    diff = _first_difference(hf_tok, tok.encode_batch, PROBE_TEXTS)
    if diff is not None:
        raise ValueError(f"{tok.path}: transformers' {_loaded_as(hf_tok, model_config)} encodes {diff[0]!r} as "
                         f"{diff[2]}, tokenizers as {diff[1]}")
    _check_loaded(hf_tok, ids, tok.path)
    return "PreTrainedTokenizerFast"


def write_tokenizer(tok, out_dir: str, max_length: int, model_config=None) -> tuple[list[str], str]:
    """Write the tokenizer files into out_dir, checked to encode the probe strings as `tok` does when
    AutoTokenizer loads them beside `model_config` (the export's transformers config; None: a custom
    model type). Returns (file names, tokenizer class AutoTokenizer loads). Raises ValueError when no
    transformers tokenizer reproduces `tok` for that model type."""
    if isinstance(tok, HFTokenizer):
        cls = _write_hf_json(tok, out_dir, max_length, model_config)
    else:
        cls = _write_spm(tok, out_dir, max_length, model_config)
    return sorted(n for n in os.listdir(out_dir) if n.startswith(("tokenizer", "special_tokens"))), cls

