"""Session fixtures for the data tests, all built here from scratch (nothing downloaded):
a ~1.5 MB C4-format corpus of Python docstrings, a 1000-piece BPE sentencepiece model trained on
it, and the corpus' train split preprocessed into a Megatron indexed dataset."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from megatron_mixln.data.preprocess import PreprocessOptions, run_preprocess  # noqa: E402
from megatron_mixln.data.sample_corpus import CorpusOptions, make_sample_corpus  # noqa: E402
from megatron_mixln.data.tokenizer_training import (TokenizerTrainOptions,  # noqa: E402
                                                    train_tokenizer)

VOCAB = 1000


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("corpus")
    return make_sample_corpus(CorpusOptions(str(out), target_mb=1.5, train_shards=4,
                                            valid_shards=1, valid_percent=3.0))


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, corpus) -> str:
    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(TokenizerTrainOptions(inputs=corpus["train"],
                                                 output_prefix=str(out / "spm"),
                                                 vocab_size=VOCAB, num_threads=2))


@pytest.fixture(scope="session")
def train_prefix(tmp_path_factory, corpus, spm_model) -> str:
    """Prefix of the preprocessed train split (one worker, --append-eod)."""
    out = tmp_path_factory.mktemp("preprocessed")
    summaries = run_preprocess(PreprocessOptions(
        output_prefix=str(out / "train"), tokenizer=spm_model, inputs=corpus["train"],
        append_eod=True, workers=1, progress=False))
    return summaries["text"]["output_prefix"]
