"""The data CLIs end to end, as a user runs them: sample corpus -> tokenizer -> preprocess, and
clean one-line errors (exit code 1, no traceback) for bad arguments and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def tool(name: str, *args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    corpus = tool("make_sample_corpus.py", "--output-dir", work / "c4", "--target-mb", "0.4",
                  "--train-shards", "3", "--valid-shards", "1", "--valid-percent", "5")
    assert corpus.returncode == 0, corpus.stderr
    spm = tool("train_tokenizer.py", "--input", str(work / "c4" / "c4-train.*.json.gz"),
               "--output-prefix", work / "spm", "--vocab-size", "600", "--model-type", "unigram")
    assert spm.returncode == 0, spm.stderr
    return work, json.loads(corpus.stdout)


def test_quickstart_pipeline(pipeline):
    from megatron_mixln.data import IndexedDataset, build_tokenizer

    work, corpus = pipeline
    assert len(corpus["train"]) == 3 and len(corpus["validation"]) == 1
    tok = build_tokenizer(str(work / "spm.model"))
    assert tok.vocab_size == 600 and tok.eod == 1
    out = tool("preprocess_c4.py", "--input", str(work / "c4" / "c4-train.*.json.gz"),
               "--tokenizer", work / "spm.model", "--output-prefix", work / "data" / "train",
               "--append-eod", "--workers", "2")
    assert out.returncode == 0, out.stderr
    prefix = str(work / "data" / "train_text_document")
    with open(prefix + ".summary.json") as fh:
        summary = json.load(fh)
    assert summary["documents"] == corpus["documents"]["train"]
    assert f"{summary['documents']:,} documents" in out.stdout
    ds = IndexedDataset(prefix, full_check=True)
    assert len(ds) == summary["documents"] and ds.num_tokens == summary["tokens"]
    assert all(ds[i][-1] == tok.eod for i in range(0, len(ds), 50))
    assert np.unique(np.asarray(ds[0])).max() < 600


def test_cli_errors_are_one_clean_line(pipeline, tmp_path):
    work, _ = pipeline
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    cases = [
        (["--input", tmp_path / "nope.json.gz"], "nope.json.gz': no such file"),
        (["--input", bad, "--workers", "0"], "--workers must be >= 1"),
        (["--input", bad, "--strict"], f"{bad}:2: malformed json"),
    ]
    for args, message in cases:
        result = tool("preprocess_c4.py", *args, "--tokenizer", work / "spm.model",
                      "--output-prefix", tmp_path / "o")
        assert result.returncode == 2, result.stderr  # bad input (megatron_mixln.errors)
        assert message in result.stderr and "Traceback" not in result.stderr
    result = tool("train_tokenizer.py", "--input", bad, "--output-prefix", tmp_path / "t",
                  "--vocab-size", "5000")
    assert result.returncode == 2 and "try a smaller one" in result.stderr
    assert "Traceback" not in result.stderr
