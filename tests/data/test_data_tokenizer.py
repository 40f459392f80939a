"""build_tokenizer over sentencepiece, Hugging Face tokenizer.json and null:N; check_vocab;
tokenizer training errors."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece

from megatron_mixln.data import build_tokenizer, check_vocab
from megatron_mixln.data.errors import DataError, TokenizerError
from megatron_mixln.data.tokenizer_training import TokenizerTrainOptions, train_tokenizer

from data_testlib import read_jsonl_texts

SENTENCE = "Return the number of items in a container."


def test_sentencepiece_model_file_and_directory(spm_model, tmp_path):
    tok = build_tokenizer(spm_model)
    reference = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    assert tok.vocab_size == reference.GetPieceSize() == 1000
    assert (tok.pad, tok.eod, tok.bos) == (0, 1, 3)  # the trainer's T5-like defaults
    assert tok.encode(SENTENCE) == reference.EncodeAsIds(SENTENCE)
    assert tok.decode(tok.encode(SENTENCE)) == SENTENCE
    texts = [SENTENCE, "Another docstring.", "x" * 50]
    assert tok.encode_batch(texts) == [reference.EncodeAsIds(t) for t in texts]
    shutil.copy(spm_model, tmp_path / "spiece.model")  # T5's layout: a directory with spiece.model
    from_dir = build_tokenizer(str(tmp_path))
    assert from_dir.encode(SENTENCE) == tok.encode(SENTENCE)
    assert "sentencepiece" in from_dir.name


def _hf_tokenizer_json(directory, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<s>", "<unk>"])
    tok.train_from_iterator(texts, trainer)
    tok.save(str(directory / "tokenizer.json"))
    return tok


def test_hugging_face_tokenizer_json(tmp_path, corpus):
    texts = read_jsonl_texts(corpus["validation"])
    reference = _hf_tokenizer_json(tmp_path, texts)
    tok = build_tokenizer(str(tmp_path))
    assert tok.vocab_size == reference.get_vocab_size()
    assert (tok.pad, tok.eod, tok.bos) == (0, 1, 2)  # found by their usual names
    assert tok.encode(texts[0]) == reference.encode(texts[0], add_special_tokens=False).ids
    assert tok.decode(tok.encode(SENTENCE)) == SENTENCE
    # tokenizer_config.json, when present, names the special tokens.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<s>"}}))
    assert build_tokenizer(str(tmp_path / "tokenizer.json")).eod == 2
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: not valid JSON"):
        build_tokenizer(str(tmp_path))


def test_null_tokenizer():
    tok = build_tokenizer("null:100")
    assert (tok.vocab_size, tok.eod) == (101, 100)
    assert tok.encode("5 7 99") == [5, 7, 99] and tok.decode([5, 7]) == "5 7"


@pytest.mark.parametrize("spec, message", [
    ("/no/such/tokenizer.model", "no such file or directory"),
    ("null:abc", "null:<vocab size>"),
])
def test_bad_tokenizer_specs(spec, message):
    with pytest.raises(TokenizerError, match=message):
        build_tokenizer(spec)


def test_output_prefix_given_as_tokenizer_suggests_the_model(spm_model):
    """train_tokenizer.py --output-prefix P writes P.model: --tokenizer P names it."""
    prefix = spm_model[:-len(".model")]
    with pytest.raises(TokenizerError) as err:
        build_tokenizer(prefix)
    assert str(err.value).endswith(f"did you mean {spm_model}?")


def test_unloadable_files(tmp_path):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="junk.model: not a loadable sentencepiece"):
        build_tokenizer(str(tmp_path / "junk.model"))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a loadable Hugging Face"):
        build_tokenizer(str(tmp_path / "tokenizer.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="neither a tokenizer.json nor"):
        build_tokenizer(str(tmp_path / "empty"))


def test_check_vocab():
    check_vocab(32000, 32000, "model")
    check_vocab(32000, 32128, "model")  # a padded model vocabulary is fine
    with pytest.raises(TokenizerError, match=r"run1: .*32100 ids .*--vocab-size is 32000"):
        check_vocab(32100, 32000, "run1")


def test_training_errors_are_clear(tmp_path, corpus):
    opts = TokenizerTrainOptions(inputs=corpus["validation"], output_prefix=str(tmp_path / "t"),
                                 vocab_size=60000)
    with pytest.raises(DataError, match="try a smaller one"):
        train_tokenizer(opts)
    opts.vocab_size, opts.bos_id = 500, 1  # bos and eos both 1
    with pytest.raises(DataError, match="distinct"):
        train_tokenizer(opts)
    assert not (tmp_path / "t.model").exists()


def test_training_on_a_truncated_gzip_names_the_file(tmp_path, corpus):
    with open(corpus["train"][0], "rb") as fh:
        data = fh.read()
    cut = tmp_path / "c4-train.00000-of-00001.json.gz"
    cut.write_bytes(data[: len(data) // 2])
    opts = TokenizerTrainOptions(inputs=[str(cut)], output_prefix=str(tmp_path / "t"),
                                 vocab_size=300)
    with pytest.raises(DataError, match=rf"^{cut}: corrupt or truncated \.gz data \(EOFError: Compressed file ended"):
        train_tokenizer(opts)
    assert not (tmp_path / "t.model").exists()
