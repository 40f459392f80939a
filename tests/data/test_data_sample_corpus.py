"""The shipped sample corpus: C4's file names and fields, the same bytes on every machine, no duplicates;
and the docstring walker it was built from."""

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
    records = list(sample_corpus.iter_docstring_documents(200))
    assert [r["url"] for r in records] == ["pydoc://stdlib/mod.py#f"]


def test_the_corpus_is_the_shipped_file_split_and_capped(tmp_path, monkeypatch):
    """Every document of the shipped file, in its order, lands in exactly one split; asking for more
    than is shipped gives all of it (and the tool says so); nothing is read from the installed Python."""
    from megatron_mixln.data import sample_corpus

    with gzip.open(sample_corpus.SHIPPED, "rt", encoding="utf-8") as fh:
        shipped = [json.loads(line) for line in fh]
    assert len(shipped) > 5000 and all(set(r) == {"text", "url"} for r in shipped)
    shipped_mb = sum(len(r["text"].encode()) for r in shipped) / 2**20
    assert sample_corpus.SHIPPED_MB <= shipped_mb < sample_corpus.SHIPPED_MB + 0.1

    def walker_must_not_run(*_a, **_k):
        raise AssertionError("make_sample_corpus read the installed docstrings")

    monkeypatch.setattr(sample_corpus, "iter_source_files", walker_must_not_run)
    out = make_sample_corpus(CorpusOptions(str(tmp_path / "all"), target_mb=1000, train_shards=2, valid_shards=1))
    train = [json.loads(line) for p in out["train"] for line in gzip.open(p, "rt", encoding="utf-8")]
    valid = [json.loads(line) for p in out["validation"] for line in gzip.open(p, "rt", encoding="utf-8")]
    assert sorted(r["url"] + r["text"] for r in train + valid) == sorted(r["url"] + r["text"] for r in shipped)
    valid_texts = {r["text"] for r in valid}
    assert [r["text"] for r in train] == [r["text"] for r in shipped if r["text"] not in valid_texts]
    assert 0.01 < len(valid) / len(shipped) < 0.03  # --valid-percent 2
    assert out["mb"] == round(shipped_mb, 3)


def test_the_tool_writes_the_same_bytes_as_the_library_and_caps_with_a_note(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "tools" / "make_sample_corpus.py"), "--output-dir",
                           str(tmp_path / "tool"), "--target-mb", "9"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 0, proc.stderr
    assert "only 8.0" in proc.stderr and "shipped" in proc.stderr
    lib = make_sample_corpus(CorpusOptions(str(tmp_path / "lib"), target_mb=9))
    tool = sorted((tmp_path / "tool").iterdir())
    assert [p.name for p in tool] == sorted(os.path.basename(p) for p in lib["train"] + lib["validation"])
    for p in tool:
        assert p.read_bytes() == file_bytes(str(tmp_path / "lib" / p.name))
