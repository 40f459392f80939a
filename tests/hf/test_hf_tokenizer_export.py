"""The exported tokenizer gives exactly the ids the training pipeline wrote.

For a BPE and a unigram sentencepiece model, each with the default normaliser (nmt_nfkc) and with
`identity`, trained by tools/train_tokenizer.py on a sample corpus built here: thousands of strings
(corpus documents and lines, and adversarial strings) encoded by the export -- AutoTokenizer with
use_fast True and False, transformers' SentencePieceBackend over the exported tokenizer.model, and the
raw tokenizer.json where one is shipped -- equal sentencepiece.encode, and the corpus documents equal
the .bin ids tools/preprocess_c4.py wrote. A tokenizer.json input is passed through and encodes as
`tokenizers` does in the pipeline.
"""
import gzip
import json
import random

import numpy as np
import pytest

from hf_testlib import run_tool, save_tiny

# pieces of adversarial strings: whitespace runs, CRLF, NFKC-compatibility and full-width forms,
# combining marks, characters outside any small vocabulary, special-token strings, the space symbol
PARTS = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", "\u00a0", "\u3000", "\ufb01", "\ufb02",
         "\uff21\uff42\uff43", "\uff11\uff12", "\u2460", "\u00bd", "\u2122", "e\u0301", "a\u0308", "\u0301",
         "\U0001f600", "\U0001f680\U0001f680", "\u4e2d\u6587", "\u0416\u0438", "\u05e9\u05dc", "<s>", "</s>",
         "<unk>", "<pad>", "<s></s>", "\u2581", "\u2581\u2581", "\x00", "\x1b", "\u200b", "00000", "1.00000004",
         "---", "...", "''", '"', "\\", "Ünïcödé", "naïve café"]


def _adversarial(words: list[str], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "  ", "\t", "\n", "\r\n", " \t \n ", "a  b", "x\ny", "tab\tx", "\ufb01", "<s>", "</s>", "<unk>",
           "<pad>", " <s>", "<s> ", "  lead", "trail  ", " both ", "\u2581", "a \u2581b", "\U0001f600\U0001f600"]
    for _ in range(n):
        k = rng.randint(1, 8)
        out.append("".join(rng.choice(PARTS) if rng.random() < 0.5 else rng.choice(words) for _ in range(k)))
    return out


def _read_docs(path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    code, _, err = run_tool("make_sample_corpus", "--output-dir", str(out), "--target-mb", "0.3",
                            "--train-shards", "1", "--valid-percent", "8")
    assert code == 0, err
    train, = sorted(out.glob("c4-train.*.json.gz"))
    valid, = sorted(out.glob("c4-validation.*.json.gz"))
    return {"dir": out, "train": train, "valid": valid, "valid_docs": _read_docs(valid)}


@pytest.fixture(scope="module")
def strings(corpus):
    docs = _read_docs(corpus["train"])
    lines = [line for d in docs[:200] for line in d.splitlines()]
    words = [w for line in lines[:400] for w in line.split(" ")]
    return docs[:150] + lines[:1500] + _adversarial(words, 1500)


@pytest.fixture(scope="module", params=[("bpe", "nmt_nfkc"), ("bpe", "identity"), ("unigram", "nmt_nfkc"),
                                        ("unigram", "identity")], ids=lambda p: "-".join(p))
def export(request, corpus, tmp_path_factory):
    """train_tokenizer -> preprocess_c4 (validation, --append-eod) -> convert_to_hf of a tiny model."""
    model_type, rule = request.param
    tmp = tmp_path_factory.mktemp(f"{model_type}-{rule}")
    code, out, err = run_tool("train_tokenizer", "--input", str(corpus["train"]), "--output-prefix", str(tmp / "spm"),
                              "--vocab-size", "1000", "--model-type", model_type, "--normalization-rule-name", rule,
                              "--num-threads", "1")
    assert code == 0, err
    model = str(tmp / "spm.model")
    code, _, err = run_tool("preprocess_c4", "--input", str(corpus["valid"]), "--tokenizer", model,
                            "--output-prefix", str(tmp / "valid"), "--append-eod", "--workers", "1", "--no-progress")
    assert code == 0, err
    save_tiny(tmp / "plain", vocab_size=1024)
    code, out, err = run_tool("convert_to_hf", "--checkpoint", str(tmp / "plain"), "--output", str(tmp / "hf"),
                              "--tokenizer", model)
    assert code == 0, err
    return {"model": model, "hf": tmp / "hf", "type": model_type, "rule": rule, "valid": str(tmp / "valid_text_document"),
            "summary": json.loads(out)}


def _exported_tokenizers(export):
    """name -> encode(list[str]) -> list[list[int]], as users and lm-eval call them (default arguments)."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    out = {}
    for use_fast in (True, False):
        tok = AutoTokenizer.from_pretrained(str(export["hf"]), use_fast=use_fast)
        out[f"AutoTokenizer(use_fast={use_fast})"] = lambda texts, tok=tok: tok(texts)["input_ids"]
        out[f"AutoTokenizer(use_fast={use_fast}).encode"] = lambda texts, tok=tok: [tok.encode(t) for t in texts]
    slow = SentencePieceBackend.from_pretrained(str(export["hf"]))
    out["SentencePieceBackend"] = lambda texts: slow(texts)["input_ids"]
    if (export["hf"] / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(export["hf"] / "tokenizer.json"))
        out["tokenizers.Tokenizer"] = lambda texts: [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    return out


def test_export_encodes_every_string_as_sentencepiece(export, strings):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=export["model"])
    want = sp.encode(strings)
    assert len(strings) > 3000
    assert sum(sp.unk_id() in ids for ids in want) > 50  # characters outside the vocabulary are exercised
    # an identity-normalised BPE model ships an exact tokenizer.json (the default); the others are
    # served by sentencepiece
    fast = export["type"] == "bpe" and export["rule"] == "identity"
    assert export["summary"]["tokenizer_class"] == ("PreTrainedTokenizerFast" if fast else "SentencePieceBackend")
    assert (export["hf"] / "tokenizer.json").exists() == fast
    for name, encode in _exported_tokenizers(export).items():
        got = encode(strings)
        bad = [(s, w, g) for s, w, g in zip(strings, want, got) if list(g) != w]
        assert not bad, f"{name}: {len(bad)} of {len(strings)} differ, first {bad[0]!r}"


def test_corpus_documents_equal_the_preprocessed_ids(export, corpus):
    from transformers import AutoTokenizer

    from megatron_mixln.data.indexed_dataset import IndexedDataset

    ds = IndexedDataset(export["valid"])
    docs = corpus["valid_docs"]
    assert len(ds) == len(docs) >= 10
    tok = AutoTokenizer.from_pretrained(str(export["hf"]))
    for i, (doc, got) in enumerate(zip(docs, tok(docs)["input_ids"])):
        written = np.asarray(ds[i]).tolist()
        assert written[-1] == tok.eos_token_id == tok.bos_token_id  # the EOD the next document follows
        assert got == written[:-1], f"document {i}"


def test_special_strings_are_text_and_unknown_characters_unk(export):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=export["model"])
    tok = AutoTokenizer.from_pretrained(str(export["hf"]))
    for text in ("<s>", "</s>", "<pad>", "<unk>"):
        ids = tok(text).input_ids
        assert ids == sp.encode(text) and sp.piece_to_id(text) not in ids
    assert tok("x \U0001f600\U0001f600").input_ids[-1] == sp.unk_id() == tok.unk_token_id
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (sp.eos_id(), sp.eos_id(), sp.pad_id())


def test_the_export_directory_exports_again_as_the_same_tokenizer(export, strings, tmp_path):
    """--tokenizer <export dir> (what convert_from_hf's tokenizer/ copy holds): the pipeline reads its
    tokenizer.json or tokenizer.model, and a second export still encodes as sentencepiece."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megatron_mixln.data.tokenizer import build_tokenizer

    texts = strings[-1500:]
    want = spm.SentencePieceProcessor(model_file=export["model"]).encode(texts)
    assert build_tokenizer(str(export["hf"])).encode_batch(texts) == want
    save_tiny(tmp_path / "plain", vocab_size=1024)
    code, _, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"),
                            "--tokenizer", str(export["hf"]))
    assert code == 0, err
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(texts)["input_ids"] == want


def test_tokenizer_json_input_passes_through(tmp_path, corpus, strings):
    """A byte-level BPE tokenizer.json (tokenizers' own trainer) with added special tokens: the export encodes
    as the pipeline's `tokenizers.Tokenizer.encode(add_special_tokens=False)`; the file is copied bit for
    bit, and without its BOS-adding post-processor when it has one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    from megatron_mixln.data.tokenizer import HFTokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(_read_docs(corpus["train"]), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False))
    save_tiny(tmp_path / "plain", vocab_size=640)
    texts = strings[:2000]
    for bos_template in (False, True):
        if bos_template:  # the pipeline never uses a post-processor, nor may the export
            raw.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                               special_tokens=[("<|endoftext|>", 0)])
        path = tmp_path / f"tok{bos_template}" / "tokenizer.json"
        path.parent.mkdir()
        raw.save(str(path))
        out = tmp_path / f"hf{bos_template}"
        code, _, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(out),
                                "--tokenizer", str(path))
        assert code == 0, err
        if bos_template:
            exported = json.loads((out / "tokenizer.json").read_text())
            assert exported.pop("post_processor") is None
            assert exported == {k: v for k, v in json.loads(path.read_text()).items() if k != "post_processor"}
        else:
            assert (out / "tokenizer.json").read_bytes() == path.read_bytes()
        pipeline = HFTokenizer(str(path))
        tok = AutoTokenizer.from_pretrained(str(out))
        assert tok(texts)["input_ids"] == pipeline.encode_batch(texts)
        assert tok.bos_token_id == tok.eos_token_id == pipeline.eod == 0


def test_a_fast_tokenizer_not_proven_equal_is_not_shipped(tmp_path, corpus, monkeypatch):
    """The probe at export time: a tokenizer.json that encodes some probe string differently (here: one
    without the whitespace handling) is dropped, and sentencepiece serves the model."""
    import json as _json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    import megatron_mixln.hf.spm_tokenizer_json as conv

    code, _, err = run_tool("train_tokenizer", "--input", str(corpus["train"]), "--output-prefix", str(tmp_path / "spm"),
                            "--vocab-size", "400", "--normalization-rule-name", "identity", "--num-threads", "1")
    assert code == 0, err
    real = conv.spm_tokenizer_json

    def without_normalizer(model_bytes):
        data = _json.loads(real(model_bytes))
        data["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        return _json.dumps(data)

    save_tiny(tmp_path / "plain", vocab_size=512)
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(conv, "spm_tokenizer_json", without_normalizer)
        out = tmp_path / f"hf{patch}"
        code, summary, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(out),
                                      "--tokenizer", str(tmp_path / "spm.model"))
        assert code == 0, err
        assert (out / "tokenizer.json").exists() is not patch
        assert _json.loads(summary)["tokenizer_class"] == ("SentencePieceBackend" if patch else "PreTrainedTokenizerFast")
        text = "  two  spaces "
        assert AutoTokenizer.from_pretrained(str(out))(text).input_ids == spm.SentencePieceProcessor(
            model_file=str(tmp_path / "spm.model")).encode(text)
