"""A Hugging Face ``tokenizers`` pipeline that gives exactly the ids ``sentencepiece.encode`` gives
(BPE models with the ``identity`` normalisation rule, as LLaMA's).

transformers' own converter (``convert_slow_tokenizer.SpmConverter``, used for LLaMA and T5) keeps only
part of sentencepiece's normaliser -- it strips no leading whitespace and, with the model vocabulary
and its added tokens, lets the text "<s>" become the control piece. Here every step of sentencepiece's
``Normalizer::Normalize`` and of its BPE encoder is reproduced (sentencepiece v0.2 src/normalizer.cc,
bpe_model.cc, sentencepiece_processor.cc):

    text --strip/collapse " "-----> remove_extra_whitespaces (" " only, as sentencepiece)
         --Prepend("▁")-----------> add_dummy_prefix (not on an empty result)
         --Replace(" ", "▁")------> escape_whitespaces; trailing "▁" stripped (literal ones too)
         --Metaspace split--------> words "▁xxx" (no piece spans one; checked)
         --BPE--------------------> ids; a run of unknown characters fuses into one <unk>

Control pieces (<s>, </s>, <pad>) and <unk> keep their ids but never come out of text, as in
sentencepiece: no merge forms them, and they are not added tokens, so ``tokenizers.Tokenizer.encode``
does not match the text "<s>" either (transformers registers them from tokenizer_config.json, where
the export sets ``split_special_tokens``).

Refused (ValueError; the export then serves sentencepiece itself): unigram models -- tokenizers'
Viterbi sums piece scores in float64, sentencepiece in float32, so exact ties (the pieces of "00000")
break differently -- and normalisation rules other than identity (nmt_nfkc, nfkc, ...): tokenizers'
``Precompiled`` normaliser (0.23) looks a grapheme cluster up by its shortest matching prefix and drops
the rest ("\ufb02\u0301" loses the accent that sentencepiece keeps as <unk>).
"""
from __future__ import annotations

SPACE = "\u2581"  # sentencepiece's kSpaceSymbol
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece.Type
UNIGRAM, BPE = 1, 2  # TrainerSpec.ModelType


def _proto(model_bytes: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def _unsupported(proto) -> str | None:
    """Why this model cannot be reproduced by the pipeline above (None when it can)."""
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    if ts.model_type == UNIGRAM:
        return "a unigram model (float64 vs float32 Viterbi: exact ties break differently)"
    if ts.model_type != BPE:
        return f"model_type {ts.model_type} (only BPE has an exact tokenizers equivalent)"
    if ts.treat_whitespace_as_suffix:
        return "treat_whitespace_as_suffix"
    if not ns.escape_whitespaces:
        return "escape_whitespaces=false"
    if ns.precompiled_charsmap or ns.normalization_rule_tsv:
        return (f"the normalisation rule {ns.name!r} (tokenizers' Precompiled normaliser maps only a prefix "
                "of a grapheme cluster: '\ufb02\u0301' loses its accent, '\u2581\u0301' vanishes)")
    kinds = {p.type for p in proto.pieces}
    if USER_DEFINED in kinds:
        return "user-defined symbols (sentencepiece matches them inside words, tokenizers only between them)"
    if UNUSED in kinds:
        return "unused pieces"
    for p in proto.pieces:
        if p.type == NORMAL and SPACE in p.piece[1:]:
            return f"piece {p.piece!r} spans a word boundary (split_by_whitespace=false)"
    return None


def _normalizer(proto):
    from tokenizers import Regex, normalizers

    ns = proto.normalizer_spec
    steps = []
    if ns.remove_extra_whitespaces:  # only " " counts as whitespace here (after the rule), as in normalizer.cc
        steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    if ns.remove_extra_whitespaces:  # sentencepiece strips trailing "▁" after escaping, literal ones too
        steps.append(normalizers.Replace(Regex(SPACE + r"+\z"), ""))
    return normalizers.Sequence(steps)


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """Merges in the order sentencepiece's BPE applies them: bpe_model.cc merges the adjacent pair whose
    concatenation has the best score (ties: the lower id); pairs forming the same piece are ordered by
    the ids of their parts. Only normal pieces are formed (never control pieces or <unk>)."""
    index = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    merges = []
    for i, p in enumerate(proto.pieces):
        if p.type == NORMAL:
            w = p.piece
            merges += [(-p.score, i, index[w[:k]], index[w[k:]], w[:k], w[k:]) for k in range(1, len(w))
                       if w[:k] in index and w[k:] in index]
    return [(m[4], m[5]) for m in sorted(merges)]


def spm_tokenizer_json(model_bytes: bytes) -> str:
    """tokenizer.json text reproducing the sentencepiece model `model_bytes` (the .model file's
    content); ids are the sentencepiece ids. Raises ValueError naming the model feature when it
    cannot be reproduced."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    proto = _proto(model_bytes)
    why = _unsupported(proto)
    if why:
        raise ValueError(f"no exact tokenizer.json for this sentencepiece model: {why}")
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    pieces = [p.piece for p in proto.pieces]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, _bpe_merges(proto),
                               unk_token=pieces[ts.unk_id], fuse_unk=True, byte_fallback=ts.byte_fallback))
    tok.normalizer = _normalizer(proto)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    steps = [decoders.Replace(SPACE, " ")] + ([decoders.ByteFallback()] if ts.byte_fallback else [])
    steps += [decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)] if ns.add_dummy_prefix else [])
    tok.decoder = decoders.Sequence(steps)
    return tok.to_str(pretty=True)
