"""Preprocessing across jobs: the input partition, tools/merge_datasets.py, and the merged parts
byte for byte equal to one process's output; bad partitions and unmergeable parts refused in one
line before any work."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from data_testlib import PYTHON, REPO, file_bytes, tool_env

from megatron_mixln.data import IndexedDatasetWriter
from megatron_mixln.data.errors import DataError
from megatron_mixln.data.multinode import merge_preprocessed, partition_files
from megatron_mixln.data.preprocess import PreprocessOptions, run_preprocess


def _run(tmp_path, name, corpus, spm_model, **kwargs) -> dict:
    return run_preprocess(PreprocessOptions(
        output_prefix=str(tmp_path / name), tokenizer=spm_model, inputs=corpus["train"],
        append_eod=True, workers=1, progress=False, **kwargs))["text"]


def test_partition_is_contiguous_balanced_and_complete():
    files = [f"f{i}" for i in range(10)]
    for n in (1, 3, 4, 10):
        parts = [partition_files(files, i, n) for i in range(n)]
        assert sum(parts, []) == files
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert partition_files(files, 2, 3) == partition_files(list(files), 2, 3) == ["f6", "f7", "f8", "f9"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus, spm_model) -> dict:
    return _run(tmp_path_factory.mktemp("one"), "all", corpus, spm_model)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, corpus, spm_model) -> list[dict]:
    out = tmp_path_factory.mktemp("parts")
    return [_run(out, f"part{i:05d}", corpus, spm_model, shard_index=i, num_shards=3) for i in range(3)]


def test_merged_parts_equal_one_process_byte_for_byte(tmp_path, one_process, parts, corpus):
    assert [p["partition"] for p in parts] == [{"shard_index": i, "num_shards": 3} for i in range(3)]
    assert [len(p["inputs"]) for p in parts] == [1, 1, 2]
    out = str(tmp_path / "merged_text_document")
    proc = subprocess.run([PYTHON, f"{REPO}/tools/merge_datasets.py", "--input",
                           *[p["output_prefix"] for p in parts], "--output-prefix", out],
                          capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 0, proc.stderr
    for ext in ("bin", "idx"):
        assert file_bytes(f"{out}.{ext}") == file_bytes(one_process[ext])
    with open(out + ".summary.json") as fh:
        summary = json.load(fh)
    assert (summary["documents"], summary["tokens"]) == (one_process["documents"], one_process["tokens"])
    assert summary["tokenizer"] == one_process["tokenizer"]
    assert [i["path"] for i in summary["inputs"]] == corpus["train"]
    assert {k: v["count"] for k, v in summary["skipped"].items()} == \
        {k: v["count"] for k, v in one_process["skipped"].items()}


def test_merge_refuses_other_dtype_tokenizer_or_eod_in_one_line(tmp_path, parts):
    good = [p["output_prefix"] for p in parts[:2]]
    other = str(tmp_path / "other")
    for ext in (".bin", ".idx", ".summary.json"):
        shutil.copy(good[1] + ext, other + ext)
    with open(other + ".summary.json") as fh:
        summary = json.load(fh)
    for field, value, message in (("tokenizer", dict(summary["tokenizer"], fingerprint="x", name="spm:other"),
                                   "tokenizer spm:other differs"),
                                  ("append_eod", False, "--append-eod False differs")):
        with open(other + ".summary.json", "w") as fh:
            json.dump(dict(summary, **{field: value}), fh)
        with pytest.raises(DataError, match=rf"^{other}.summary.json: {message}"):
            merge_preprocessed([good[0], other], str(tmp_path / "m"))
    int32 = str(tmp_path / "int32")
    with IndexedDatasetWriter(int32, np.int32) as writer:
        writer.add_document([1, 2, 3])
    with pytest.raises(DataError, match=rf"^{int32}.idx: dtype int32 differs from .*uint16; cannot merge"):
        merge_preprocessed([good[0], int32], str(tmp_path / "m"))
    proc = subprocess.run([PYTHON, f"{REPO}/tools/merge_datasets.py", "--input", good[0], int32,
                           "--output-prefix", str(tmp_path / "m")], capture_output=True, text=True,
                          env=tool_env())
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("m*"))


@pytest.mark.parametrize("flags, message", [
    (["--shard-index", "3", "--num-shards", "3"], r"--shard-index 3: must be in 0..2 \(--num-shards 3\)"),
    (["--shard-index", "0", "--num-shards", "9"], r"--num-shards 9: only 4 input files"),
    (["--num-shards", "2", "--max-docs", "5"], r"--max-docs: cannot be combined with --num-shards"),
])
def test_bad_partition_flags_fail_in_one_line_before_work(tmp_path, corpus, spm_model, flags, message):
    inputs = [arg for path in corpus["train"] for arg in ("--input", path)]
    proc = subprocess.run([PYTHON, f"{REPO}/tools/preprocess_c4.py", *inputs,
                           "--tokenizer", spm_model, "--output-prefix", str(tmp_path / "x"), "--no-progress",
                           *flags], capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert re.search(message, proc.stderr)
    assert not list(tmp_path.glob("x*"))
