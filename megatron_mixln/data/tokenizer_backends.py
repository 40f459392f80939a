"""Which library encodes documents during preprocessing: a fast one only where it is exact.

The *reference* encoder of a tokenizer is its own library: ``sentencepiece`` for a ``.model``,
Hugging Face ``tokenizers`` for a ``tokenizer.json``. ``gigatoken`` (PyPI, optional) encodes the
same vocabularies several times faster per core; it is used only for the tokenizer kinds that a
property test (``tests/data/test_data_tokenizer_backends.py``: the sample corpus plus adversarial
strings -- whitespace runs, newlines, NFKC characters, characters outside the vocabulary, the text
of special tokens) shows it encodes exactly as the reference:

  * byte-level BPE ``tokenizer.json`` (GPT-2 / LLaMA-3 style: ``ByteLevel`` pre-tokenizer, alone or
    after a ``Split``; no normalizer): every document;
  * sentencepiece BPE ``.model`` with byte fallback and the identity normalizer, no extra-whitespace
    removal (LLaMA-2 style): every document *except* those containing the text of a non-normal
    piece (``<s>``, ``</s>``, ``<pad>``, ``<unk>``, ``<0x41>``, user-defined symbols), which
    gigatoken turns into that piece's id where sentencepiece spells the characters out; those
    documents are routed to sentencepiece. Models with an NFKC normalizer differ on ordinary
    adversarial text (whitespace and zero-width characters) and unigram models are not supported
    by gigatoken: both keep sentencepiece.

Two guards stay on whatever the test says: ``select_backend`` cross-checks a sample of the user's
corpus at start and falls back to the reference on any difference; ``FastTokenizer`` re-checks a
random ``verify_fraction`` of documents while it runs and raises ``TokenizerMismatchError``.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Sequence

import numpy as np

from .errors import TokenizerError
from .tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

BACKENDS = ("auto", "sentencepiece", "hf", "gigatoken")
GIGATOKEN_PIN = "gigatoken==0.10.0"


class TokenizerMismatchError(TokenizerError):
    """The fast backend and the reference gave different ids for document ``index`` of a batch."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def reference_backend(tokenizer: Tokenizer) -> str:
    """``sentencepiece`` / ``hf`` for those tokenizers, ``null`` for the null tokenizer."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        return "sentencepiece"
    if isinstance(tokenizer, HFTokenizer):
        return "hf"
    return "null"


def gigatoken_installed() -> bool:
    try:
        import gigatoken  # noqa: F401
    except ImportError:
        return False
    return True


def _sentencepiece_model(path: str):
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as fh:
        model.ParseFromString(fh.read())
    return model


def gigatoken_claim(tokenizer: Tokenizer) -> tuple[bool, str]:
    """(exact, why): whether ``tokenizer`` is of a kind the property test shows gigatoken encodes
    exactly as the reference (see the module docstring), and the reason in words."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        model = _sentencepiece_model(tokenizer.model_path)
        trainer, normalizer = model.trainer_spec, model.normalizer_spec
        if trainer.model_type != trainer.BPE:
            return False, f"a {trainer.ModelType.Name(trainer.model_type).lower()} sentencepiece model (gigatoken encodes BPE only)"
        if not trainer.byte_fallback:
            return False, "a sentencepiece BPE model without byte fallback (gigatoken needs it)"
        if normalizer.name != "identity" or normalizer.precompiled_charsmap:
            return False, (f"a sentencepiece model with the {normalizer.name!r} normalizer "
                           f"(gigatoken differs on whitespace/zero-width text; only 'identity' is exact)")
        if normalizer.remove_extra_whitespaces or trainer.treat_whitespace_as_suffix:
            return False, "a sentencepiece model that removes extra whitespace or puts it as a suffix"
        return True, ("a sentencepiece BPE model with byte fallback and the identity normalizer; "
                      "documents containing special-piece text go to sentencepiece")
    if isinstance(tokenizer, HFTokenizer):
        with open(tokenizer.path, encoding="utf-8") as fh:
            spec = json.load(fh)
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        members = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        kinds = [m.get("type") for m in members]
        if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
            return False, f"a {model.get('type')} tokenizer.json (only byte-level BPE is exact)"
        if spec.get("normalizer") is not None:
            return False, "a tokenizer.json with a normalizer (only byte-level BPE without one is exact)"
        if "ByteLevel" not in kinds or set(kinds) - {"ByteLevel", "Split"}:
            return False, f"a tokenizer.json with pre-tokenizers {kinds} (needs ByteLevel, optionally after Split)"
        return True, "a byte-level BPE tokenizer.json"
    return False, "the null tokenizer (nothing to speed up)"


class FastTokenizer(Tokenizer):
    """``reference``'s identity (name, fingerprint, vocabulary, special ids) with gigatoken's
    encoder. Documents containing the text of a sentencepiece model's non-normal pieces go to the
    reference; a random ``verify_fraction`` of the others is re-encoded by the reference."""

    def __init__(self, reference: Tokenizer, verify_fraction: float = 0.0, seed: int = 0) -> None:
        import gigatoken

        self.reference = reference
        self.name, self.fingerprint, self.vocab_size = reference.name, reference.fingerprint, reference.vocab_size
        self.eod, self.pad, self.bos = reference.eod, reference.pad, reference.bos
        self.verify_fraction = verify_fraction
        self._rng = np.random.default_rng(seed)
        self._route = None
        if isinstance(reference, SentencePieceTokenizer):
            self._fast = gigatoken.Tokenizer.from_sentencepiece(reference.model_path)
            model = _sentencepiece_model(reference.model_path)
            special = sorted({p.piece for p in model.pieces if p.type != p.NORMAL}, key=len, reverse=True)
            self._route = re.compile("|".join(map(re.escape, special))) if special else None
        else:
            with open(reference.path, encoding="utf-8") as fh:
                self._fast = gigatoken.Tokenizer.from_json(fh.read())
        self.routed = self.verified = 0

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        flat, lengths = self.encode_flat(texts)
        ends = np.cumsum(lengths)
        return [flat[e - n:e].tolist() for e, n in zip(ends, lengths)]

    def encode_flat(self, texts: Sequence[str], verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """`verify=False`: skip the --verify-fraction sample (the start-up cross-check compares every text)."""
        texts = list(texts)
        routed = ([i for i, t in enumerate(texts) if self._route.search(t)]
                  if self._route is not None else [])
        skip = set(routed)
        fast_texts = [t for i, t in enumerate(texts) if i not in skip] if routed else texts
        encoded = self._fast.encode_batch(fast_texts, parallel=False)
        offsets = np.asarray(encoded.layout.offsets, dtype=np.int64)
        flat = np.asarray(encoded.layout.content.data)[offsets[0]:offsets[-1]].astype(np.int64)
        lengths = np.diff(offsets)
        if verify:
            self._verify(fast_texts, flat, lengths, routed)
        if not routed:
            return flat, lengths
        self.routed += len(routed)
        return _splice(flat, lengths, routed, *self.reference.encode_flat([texts[i] for i in routed]))

    def _verify(self, texts: list[str], flat: np.ndarray, lengths: np.ndarray, routed: list[int]) -> None:
        if self.verify_fraction <= 0 or not texts:
            return
        chosen = np.flatnonzero(self._rng.random(len(texts)) < self.verify_fraction)
        if not len(chosen):
            return
        ref_flat, ref_lengths = self.reference.encode_flat([texts[i] for i in chosen])
        ends, ref_ends = np.cumsum(lengths), np.cumsum(ref_lengths)
        for j, i in enumerate(chosen):
            ours = flat[ends[i] - lengths[i]:ends[i]]
            theirs = ref_flat[ref_ends[j] - ref_lengths[j]:ref_ends[j]]
            if not np.array_equal(ours, theirs):
                index = _position_before_routing(int(i), routed)
                raise TokenizerMismatchError(
                    f"--verify-fraction: gigatoken and {reference_backend(self.reference)} encode a "
                    f"document differently ({texts[i][:60]!r}...); stopped. Rerun with "
                    f"--tokenizer-backend {reference_backend(self.reference)}", index)
        self.verified += len(chosen)


def _position_before_routing(i: int, routed: list[int]) -> int:
    """Index in the whole batch of the i-th document that was not routed."""
    for r in routed:  # routed is sorted
        if r <= i:
            i += 1
    return i


def _splice(flat: np.ndarray, lengths: np.ndarray, routed: list[int], r_flat: np.ndarray,
            r_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interleave the routed documents' ids back at their batch positions."""
    n = len(lengths) + len(routed)
    is_routed = np.zeros(n, bool)
    is_routed[routed] = True
    all_lengths = np.empty(n, np.int64)
    all_lengths[~is_routed], all_lengths[is_routed] = lengths, r_lengths
    out = np.empty(int(all_lengths.sum()), np.int64)
    doc_of_token = np.repeat(is_routed, all_lengths)
    out[~doc_of_token], out[doc_of_token] = flat, r_flat
    return out, all_lengths


def _differences(fast: FastTokenizer, reference: Tokenizer, texts: list[str]) -> int:
    """How many of `texts` the two encode differently (a difference is counted, never raised)."""
    a_flat, a_len = fast.encode_flat(texts, verify=False)
    b_flat, b_len = reference.encode_flat(texts)
    if np.array_equal(a_len, b_len) and np.array_equal(a_flat, b_flat):
        return 0
    a_ends, b_ends = np.cumsum(a_len), np.cumsum(b_len)
    return sum(not np.array_equal(a_flat[a_ends[i] - a_len[i]:a_ends[i]], b_flat[b_ends[i] - b_len[i]:b_ends[i]])
               for i in range(len(texts)))


def select_backend(tokenizer: Tokenizer, requested: str, sample: Callable[[], list[str]],
                   verify_fraction: float = 0.0) -> tuple[Tokenizer, dict]:
    """The encoder to preprocess with, and a summary of the choice.

    ``requested``: one of ``BACKENDS``. ``sample()``: documents of the user's corpus (first N and
    random N; read only when needed) cross-checked against the reference when a fast backend is chosen; any difference
    falls back to the reference, with the reason in ``info["reason"]``. Raises TokenizerError
    (naming ``--tokenizer-backend``) for a backend that is not installed or does not read this
    tokenizer's format.
    """
    reference = reference_backend(tokenizer)
    info = {"requested": requested, "used": reference, "reference": reference, "reason": "",
            "cross_checked_at_start": 0, "fell_back": False}
    if requested not in BACKENDS:
        raise TokenizerError(f"--tokenizer-backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested in ("sentencepiece", "hf") and requested != reference:
        reads = "sentencepiece .model files" if requested == "sentencepiece" else "tokenizer.json files"
        instead = "auto" if reference == "null" else f"auto or {reference}"
        raise TokenizerError(f"--tokenizer-backend {requested}: reads {reads} only, but --tokenizer is "
                             f"{tokenizer.name}; use --tokenizer-backend {instead}")
    if requested == reference:
        info["reason"] = "asked for"
        return tokenizer, info
    exact, why = gigatoken_claim(tokenizer)
    if requested == "gigatoken":
        if not gigatoken_installed():
            raise TokenizerError(f"--tokenizer-backend gigatoken: the gigatoken package is not installed "
                                 f"(pip install {GIGATOKEN_PIN}), or use --tokenizer-backend auto")
        if not exact:
            raise TokenizerError(f"--tokenizer-backend gigatoken: not shown to be exact for {why}; "
                                 f"use --tokenizer-backend auto (which picks {reference})")
    elif not exact:
        info["reason"] = f"gigatoken is not shown to be exact for {why}"
        return tokenizer, info
    elif not gigatoken_installed():
        info["reason"] = f"gigatoken is not installed (pip install {GIGATOKEN_PIN})"
        return tokenizer, info
    fast = FastTokenizer(tokenizer, verify_fraction)
    texts = sample()
    info["cross_checked_at_start"] = len(texts)
    differing = _differences(fast, tokenizer, texts)
    if differing:
        info["fell_back"] = True
        info["reason"] = (f"gigatoken differed from {reference} on {differing} of the {len(texts)} "
                          f"documents cross-checked at start; using {reference}")
        return tokenizer, info
    info["used"], info["reason"] = "gigatoken", f"exact for {why}; {len(texts)} documents cross-checked"
    return fast, info


def build_encoder(spec: str, backend: str, verify_fraction: float = 0.0) -> Tokenizer:
    """In a worker: the tokenizer ``spec`` with the backend ``select_backend`` chose."""
    from .tokenizer import build_tokenizer

    tokenizer = build_tokenizer(spec)
    return FastTokenizer(tokenizer, verify_fraction) if backend == "gigatoken" else tokenizer
