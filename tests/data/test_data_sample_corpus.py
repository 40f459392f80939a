"""The docstring corpus: C4's file names and fields, deterministic bytes, no duplicates."""

from __future__ import annotations

import gzip
import json
import os

from megatron_mixln.data.sample_corpus import CorpusOptions, make_sample_corpus

from data_testlib import file_bytes


def test_corpus_is_c4_shaped_deterministic_and_deduplicated(tmp_path):
    opts = dict(target_mb=0.3, train_shards=3, valid_shards=2, valid_percent=10.0, min_chars=150)
    a = make_sample_corpus(CorpusOptions(str(tmp_path / "a"), **opts))
    b = make_sample_corpus(CorpusOptions(str(tmp_path / "b"), **opts))
    names = [os.path.basename(p) for p in a["train"] + a["validation"]]
    assert names == ["c4-train.00000-of-00003.json.gz", "c4-train.00001-of-00003.json.gz",
                     "c4-train.00002-of-00003.json.gz", "c4-validation.00000-of-00002.json.gz",
                     "c4-validation.00001-of-00002.json.gz"]
    for pa, pb in zip(a["train"] + a["validation"], b["train"] + b["validation"]):
        assert file_bytes(pa) == file_bytes(pb)
    records = []
    for path in a["train"] + a["validation"]:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            records += [json.loads(line) for line in fh]
    assert all(set(r) == {"text", "timestamp", "url"} for r in records)
    assert all(len(r["text"]) >= 150 for r in records)
    assert len({" ".join(r["text"].split()) for r in records}) == len(records)
    assert len(records) == a["documents"]["train"] + a["documents"]["validation"]
    assert 0.3 <= sum(len(r["text"].encode()) for r in records) / 2**20 < 0.35
    assert 0 < a["documents"]["validation"] < a["documents"]["train"]


def test_docstrings_that_are_not_utf8_text_are_skipped(tmp_path, monkeypatch):
    from megatron_mixln.data import sample_corpus

    source = tmp_path / "src" / "mod.py"
    source.parent.mkdir()
    prose = "An ordinary docstring of a function, long enough to be kept in the corpus. " * 4
    source.write_text(f'"""A lone \\udc80 surrogate. {prose}"""\n\n'
                      f'def f():\n    """{prose}"""\n', encoding="utf-8")
    monkeypatch.setattr(sample_corpus, "iter_source_files",
                        lambda: iter([("stdlib", str(source.parent), "mod.py")]))
    out = make_sample_corpus(CorpusOptions(str(tmp_path / "c4"), target_mb=1, train_shards=1,
                                           valid_shards=0))
    with gzip.open(out["train"][0], "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    assert [r["url"] for r in records] == ["pydoc://stdlib/mod.py#f"]
