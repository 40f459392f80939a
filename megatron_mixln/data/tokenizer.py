"""One tokenizer interface over sentencepiece models, Hugging Face ``tokenizer.json`` and a null
tokenizer, so the preprocessor and the trainer do not care which one the user brought.

``build_tokenizer`` accepts:
  * a sentencepiece model file (``spm.model``, T5's ``spiece.model``, LLaMA's ``tokenizer.model``);
  * a Hugging Face ``tokenizer.json`` file, or a directory holding one (a ``tokenizer_config.json``
    beside it names the eos/bos/pad tokens), or a directory holding a single sentencepiece model;
  * ``null:N`` -- Megatron's NullTokenizer: the text is whitespace-separated integer ids < N and
    the end-of-document id is N (vocabulary N + 1). Handy for tests and pre-tokenized corpora.

Documents are encoded without BOS/EOS, as Megatron's tokenizers do; the preprocessor appends the
end-of-document id itself with ``--append-eod``.
"""

from __future__ import annotations

import hashlib
import json
import os
from itertools import chain
from typing import Sequence

import numpy as np

from .errors import TokenizerError


def _file_sha1(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """What the pipeline needs from a tokenizer. ``eod``/``pad``/``bos`` are None when absent."""

    name: str  # human-readable identity for summaries
    fingerprint: str  # changes whenever the ids it produces may change (used in cache keys)
    vocab_size: int
    eod: int | None = None
    pad: int | None = None
    bos: int | None = None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of ``texts`` concatenated (int64 ``[sum(lengths)]``) and each one's length
        (int64 ``[len(texts)]``): what the preprocessor writes, without a list per document."""
        ids = self.encode_batch(texts)
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        return np.fromiter(chain.from_iterable(ids), np.int64, int(lengths.sum())), lengths

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} vocab={self.vocab_size} eod={self.eod}>"


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path: str) -> None:
        import sentencepiece

        self.model_path = os.path.abspath(model_path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_path)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{model_path}: not a loadable sentencepiece model ({err})") from None
        self.vocab_size = self._sp.GetPieceSize()
        self.fingerprint = "sentencepiece:" + _file_sha1(self.model_path)
        self.name = f"sentencepiece:{self.model_path}"

        def special(i: int) -> int | None:
            return i if 0 <= i < self.vocab_size else None

        self.eod = special(self._sp.eos_id())
        self.pad = special(self._sp.pad_id())
        self.bos = special(self._sp.bos_id())

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: parallelism comes from worker processes, which scale better and keep the
        # single-worker figures honest.
        return self._sp.Encode(list(texts), out_type=int, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.Decode([int(i) for i in ids])


# Token strings tried, in order, when tokenizer_config.json does not name the special tokens.
_HF_CANDIDATES = {
    "eod": ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]", "<|eot_id|>"],
    "bos": ["<s>", "<|begin_of_text|>", "<bos>", "[CLS]"],
    "pad": ["<pad>", "[PAD]", "<|pad|>"],
}
_HF_CONFIG_KEYS = {"eod": "eos_token", "bos": "bos_token", "pad": "pad_token"}


class HFTokenizer(Tokenizer):
    def __init__(self, tokenizer_json: str) -> None:
        import tokenizers

        self.path = os.path.abspath(tokenizer_json)
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as err:  # the Rust side raises a bare Exception on bad files
            raise TokenizerError(f"{tokenizer_json}: not a loadable Hugging Face tokenizer.json "
                                 f"({err})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = "hf:" + _file_sha1(self.path)
        self.name = f"huggingface:{self.path}"
        config = {}
        config_path = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as fh:
                    config = json.load(fh)
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                raise TokenizerError(f"{config_path}: not valid JSON ({err})") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_path}: expected a JSON object")
        for attr, key in _HF_CONFIG_KEYS.items():
            setattr(self, attr, self._special_id(config.get(key), _HF_CANDIDATES[attr]))

    def _special_id(self, configured, candidates: list[str]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for token in ([configured] if configured else []) + candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: text is whitespace-separated ids; eod is ``N``, vocabulary N + 1.

    Ids are NOT range-checked here on purpose: the preprocessor's own check must catch them.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size + 1
        self.eod = vocab_size
        self.name = self.fingerprint = f"null:{vocab_size}"

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        try:
            return [[int(tok) for tok in text.split()] for text in texts]
        except ValueError as err:
            raise TokenizerError(f"null tokenizer expects whitespace-separated integers: {err}")

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


_SP_NAMES = ("tokenizer.model", "spiece.model", "sentencepiece.model")


def build_tokenizer(kind_or_path: "str | os.PathLike | Tokenizer") -> Tokenizer:
    """A tokenizer from a sentencepiece model, a tokenizer.json (or its directory), or ``null:N``."""
    if isinstance(kind_or_path, Tokenizer):
        return kind_or_path
    spec = os.fspath(kind_or_path)
    if spec.startswith("null:"):
        try:
            return NullTokenizer(int(spec[5:]))
        except ValueError:
            raise TokenizerError(f"tokenizer {spec!r}: expected null:<vocab size>") from None
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "tokenizer.json")):
            return HFTokenizer(os.path.join(spec, "tokenizer.json"))
        models = [n for n in _SP_NAMES if os.path.isfile(os.path.join(spec, n))]
        models = models or sorted(n for n in os.listdir(spec) if n.endswith(".model"))
        if len(models) >= 1:
            return SentencePieceTokenizer(os.path.join(spec, models[0]))
        raise TokenizerError(f"{spec}: directory has neither a tokenizer.json nor a sentencepiece "
                             f"*.model file")
    if os.path.isfile(spec):
        if spec.endswith(".json"):
            return HFTokenizer(spec)
        return SentencePieceTokenizer(spec)
    # train_tokenizer.py --output-prefix P writes P.model: given P, name that file
    hint = f"; did you mean {spec}.model?" if os.path.isfile(spec + ".model") else ""
    raise TokenizerError(
        f"tokenizer {spec!r}: no such file or directory; expected a sentencepiece .model file, a "
        f"Hugging Face tokenizer.json or its directory, or null:<vocab size>{hint}")


def check_vocab(tokenizer_vocab: int, model_vocab: int, where: str) -> None:
    """Fail clearly when token ids could index past the model's embedding table.

    A model vocabulary larger than the tokenizer's is fine (Megatron pads it to a multiple of 128
    or of the tensor-parallel size); a smaller one is a silent out-of-range embedding lookup.
    """
    if tokenizer_vocab > model_vocab:
        raise TokenizerError(
            f"{where}: the tokenizer's vocabulary has {tokenizer_vocab} ids but the model's "
            f"--vocab-size is {model_vocab}; ids {model_vocab}..{tokenizer_vocab - 1} would index "
            f"past the embedding table. Set --vocab-size to at least {tokenizer_vocab} (padding it "
            f"up, e.g. to a multiple of 128, is fine) or use the tokenizer the data was made with")
