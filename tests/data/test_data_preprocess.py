"""preprocess_c4: tokens against an independent encode of the corpus, byte-identical output for
any worker count / chunking / kill-and-resume, and every kind of bad input reported by file:line."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import shutil
import subprocess
import time

import numpy as np
import pytest
import sentencepiece

from megatron_mixln.data import IndexedDataset
from megatron_mixln.data.errors import BadInputError, DataError, TokenizerError
from megatron_mixln.data.preprocess import PreprocessOptions, run_preprocess

from data_testlib import PYTHON, REPO, file_bytes, read_jsonl_texts, tool_env, write_lines


def run(prefix, inputs, tokenizer, **kw) -> dict:
    kw.setdefault("progress", False)
    opts = PreprocessOptions(output_prefix=str(prefix), tokenizer=tokenizer,
                             inputs=[str(i) for i in inputs], **kw)
    return run_preprocess(opts)


def same_files(prefix_a: str, prefix_b: str) -> bool:
    return all(file_bytes(prefix_a + ext) == file_bytes(prefix_b + ext) for ext in (".bin", ".idx"))


def test_tokens_match_an_independent_encode(train_prefix, corpus, spm_model):
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    texts = read_jsonl_texts(corpus["train"])
    expected = [sp.EncodeAsIds(t) + [sp.eos_id()] for t in texts]
    ds = IndexedDataset(train_prefix, full_check=True)
    assert ds.dtype == np.uint16 and len(ds) == len(texts)
    assert np.array_equal(ds.sequence_lengths, [len(e) for e in expected])
    assert all(np.array_equal(ds[i], e) for i, e in enumerate(expected))
    with open(train_prefix + ".summary.json") as fh:
        summary = json.load(fh)
    assert summary["documents"] == len(texts)
    assert summary["tokens"] == sum(map(len, expected))
    assert summary["tokenizer"]["vocab_size"] == 1000 and summary["dtype"] == "uint16"
    assert [i["path"] for i in summary["inputs"]] == corpus["train"]
    assert summary["skipped"] == {}
    assert not os.path.exists(train_prefix.replace("_text_document", "") + ".shards")


def test_two_workers_and_byte_range_chunks_give_the_same_bytes(tmp_path, corpus, spm_model,
                                                               train_prefix):
    two = run(tmp_path / "two", corpus["train"], spm_model, append_eod=True, workers=2)
    assert same_files(two["text"]["output_prefix"], train_prefix)
    # One plain JSON-lines file cut into ~30 byte ranges (cut points land mid-line).
    plain = tmp_path / "all.jsonl"
    write_lines(plain, [json.dumps({"text": t}) for t in read_jsonl_texts(corpus["train"])])
    chunked = run(tmp_path / "chunked", [plain], spm_model, append_eod=True, workers=2,
                  chunk_mb=os.path.getsize(plain) / 30 / 2**20)
    assert chunked["text"]["shards"]["total"] >= 30
    assert same_files(chunked["text"]["output_prefix"], train_prefix)


def test_kill_then_rerun_resumes_and_matches(tmp_path, corpus, spm_model):
    texts = read_jsonl_texts(corpus["train"])
    for i in range(10):
        write_lines(tmp_path / f"in-{i:02d}.jsonl.gz", [json.dumps({"text": t}) for t in texts[i::10]])
    pattern = str(tmp_path / "in-*.jsonl.gz")
    reference = run(tmp_path / "ref", [pattern], spm_model, append_eod=True)["text"]
    out = str(tmp_path / "out")
    cmd = [PYTHON, os.path.join(REPO, "tools", "preprocess_c4.py"), "--input", pattern,
           "--tokenizer", spm_model, "--output-prefix", out, "--append-eod", "--workers", "2",
           "--no-progress", "--keep-shards"]
    proc = subprocess.Popen(cmd, env=tool_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not glob.glob(out + ".shards/*.done") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: main process and its workers
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = {p: os.stat(p).st_mtime_ns for p in glob.glob(out + ".shards/*.done")}
    assert 1 <= len(done_before) < 10
    assert not os.path.exists(out + "_text_document.bin")

    rerun = subprocess.run(cmd, env=tool_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    with open(out + "_text_document.summary.json") as fh:
        shards = json.load(fh)["shards"]
    assert shards["reused"] == len(done_before) and shards["processed"] == 10 - len(done_before)
    assert {p: os.stat(p).st_mtime_ns for p in done_before} == done_before  # not redone
    assert same_files(out + "_text_document", reference["output_prefix"])


def test_workers_do_not_outlive_a_killed_parent(tmp_path):
    psutil = pytest.importorskip("psutil")
    line = json.dumps({"text": " ".join(str(j % 90) for j in range(200))})
    for i in range(4):
        write_lines(tmp_path / f"in-{i}.jsonl", [line] * 20000)
    cmd = [PYTHON, os.path.join(REPO, "tools", "preprocess_c4.py"), "--input",
           str(tmp_path / "in-*.jsonl"), "--tokenizer", "null:100", "--output-prefix",
           str(tmp_path / "out"), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=tool_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers, deadline = [], time.time() + 120
    while len(workers) < 2 and proc.poll() is None and time.time() < deadline:
        workers = psutil.Process(proc.pid).children()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer or kill -9 do
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    try:
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers {[p.pid for p in alive]} outlived their parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


BAD_LINES = [
    json.dumps({"text": "A good first document."}),          # 1
    '{"text": "unterminated',                                 # 2 malformed_json
    json.dumps({"url": "https://example.com"}),               # 3 missing_key
    json.dumps({"text": "   \n "}),                           # 4 empty_text
    b'{"text": "caf\xe9 latin-1"}',                           # 5 invalid_utf8
    json.dumps(["a", "list"]),                                # 6 not_an_object
    json.dumps({"text": 42}),                                 # 7 not_a_string
    '{"text": "a lone \\udc80 surrogate"}',                   # 8 unencodable_text
    "",                                                       # 9 blank_line
    json.dumps({"text": "\u200b"}),                           # 10 no_tokens
    json.dumps({"text": "A good second document."}),         # 11
]
BAD_REASONS = {"malformed_json": 2, "missing_key": 3, "empty_text": 4, "invalid_utf8": 5,
               "not_an_object": 6, "not_a_string": 7, "unencodable_text": 8, "blank_line": 9,
               "no_tokens": 10}


@pytest.mark.parametrize("chunked", [False, True])
def test_bad_lines_are_counted_with_file_and_line(tmp_path, spm_model, chunked):
    path = write_lines(tmp_path / "bad.jsonl", BAD_LINES * 3)
    kw = {"chunk_mb": 40 / 2**20, "workers": 2} if chunked else {}
    summary = run(tmp_path / "out", [path], spm_model, **kw)["text"]
    assert summary["documents"] == 6
    assert {r: v["count"] for r, v in summary["skipped"].items()} == dict.fromkeys(BAD_REASONS, 3)
    for reason, line in BAD_REASONS.items():
        shown = [e.split(": ")[0] for e in summary["skipped"][reason]["examples"]]
        assert shown == [f"{path}:{line + k * len(BAD_LINES)}" for k in range(3)], reason
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    ds = IndexedDataset(summary["output_prefix"])
    assert np.array_equal(ds[1], sp.EncodeAsIds("A good second document."))


def test_strict_fails_at_the_first_bad_line_and_keeps_old_output(tmp_path, spm_model):
    good = write_lines(tmp_path / "good.jsonl", [BAD_LINES[0], BAD_LINES[-1]])
    bad = write_lines(tmp_path / "bad.jsonl", BAD_LINES)
    prefix = run(tmp_path / "out", [good], spm_model, strict=True)["text"]["output_prefix"]
    before = file_bytes(prefix + ".bin"), file_bytes(prefix + ".idx")
    with pytest.raises(BadInputError, match=rf"{bad}:2: malformed json.*--strict"):
        run(tmp_path / "out", [bad], spm_model, strict=True)
    assert (file_bytes(prefix + ".bin"), file_bytes(prefix + ".idx")) == before


def test_strict_line_numbers_are_absolute_in_byte_ranges(tmp_path, spm_model):
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(200)]
    lines[150] = '{"broken'
    path = write_lines(tmp_path / "big.jsonl", lines)
    with pytest.raises(BadInputError, match=rf"{path}:151: malformed json"):
        run(tmp_path / "out", [path], spm_model, strict=True, chunk_mb=500 / 2**20)


def test_large_vocabulary_is_written_as_int32(tmp_path):
    path = write_lines(tmp_path / "ids.jsonl", [json.dumps({"text": "5 69999 3"}),
                                                json.dumps({"text": "65535 70000"})])
    summary = run(tmp_path / "out", [path], "null:70001", append_eod=True)["text"]
    assert summary["dtype"] == "int32"
    ds = IndexedDataset(summary["output_prefix"])
    assert ds.dtype == np.int32
    assert ds[0].tolist() == [5, 69999, 3, 70001] and ds[1].tolist() == [65535, 70000, 70001]


def test_ids_beyond_the_vocabulary_fail_naming_the_line(tmp_path):
    path = write_lines(tmp_path / "ids.jsonl", [json.dumps({"text": "1 2"}),
                                                json.dumps({"text": "5 70000"})])
    with pytest.raises(TokenizerError, match=rf"{path}:2: token id 70000 .*vocabulary 0\.\.1000"
                                             rf" and does not fit the output dtype uint16"):
        run(tmp_path / "out", [path], "null:1000")
    assert not glob.glob(str(tmp_path / "out_text_document*"))


def test_arguments_are_checked_before_any_work(tmp_path, spm_model):
    good = write_lines(tmp_path / "good.jsonl", [BAD_LINES[0]])
    with pytest.raises(DataError, match="no such file"):
        run(tmp_path / "o", [tmp_path / "missing.json.gz"], spm_model)
    with pytest.raises(DataError, match="matches no files"):
        run(tmp_path / "o", [tmp_path / "nothing-*.json"], spm_model)
    with pytest.raises(DataError, match="--workers must be >= 1"):
        run(tmp_path / "o", [good], spm_model, workers=0)
    (tmp_path / "afile").write_text("")
    with pytest.raises(DataError, match="--output-prefix .*cannot create"):
        run(tmp_path / "afile" / "o", [good], spm_model)
    array_file = tmp_path / "array.json"
    array_file.write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(DataError, match="array.json: looks like one JSON array"):
        run(tmp_path / "o", [array_file], spm_model)
    with pytest.raises(DataError, match="expected JSON lines"):
        run(tmp_path / "o", [tmp_path / "afile"], spm_model)
    with pytest.raises(DataError, match="--json-keys"):
        run(tmp_path / "o", [good], spm_model, json_keys=["a/b"])
    assert not glob.glob(str(tmp_path / "o*"))  # nothing was started


def test_max_docs_and_several_json_keys(tmp_path, corpus, spm_model, train_prefix):
    summary = run(tmp_path / "o", corpus["train"], spm_model, append_eod=True, workers=2,
                  max_docs=1000, json_keys=["text", "url"])
    text, url = summary["text"], summary["url"]
    assert text["documents"] == url["documents"] == 1000
    full, first = IndexedDataset(train_prefix), IndexedDataset(text["output_prefix"])
    assert all(np.array_equal(first[i], full[i]) for i in range(1000))
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    urls = read_jsonl_texts(corpus["train"], key="url")[:1000]
    urls_ds = IndexedDataset(url["output_prefix"])
    assert all(urls_ds[i].tolist() == sp.EncodeAsIds(u) + [1] for i, u in enumerate(urls))


def test_hugging_face_dataset_from_a_local_directory(tmp_path, corpus, spm_model):
    texts = read_jsonl_texts(corpus["validation"])
    parts = []
    for i in range(3):
        (tmp_path / "hf").mkdir(exist_ok=True)
        parts.append(write_lines(tmp_path / "hf" / f"part-{i}.jsonl",
                                 [json.dumps({"text": t}) for t in texts[i::3]]))
    from_files = run(tmp_path / "files", parts, spm_model, append_eod=True)["text"]
    from_hf = run_preprocess(PreprocessOptions(
        output_prefix=str(tmp_path / "hub"), tokenizer=spm_model, hf_dataset=str(tmp_path / "hf"),
        append_eod=True, workers=2, progress=False))["text"]
    assert from_hf["shards"]["total"] == 3
    assert same_files(from_hf["output_prefix"], from_files["output_prefix"])


def _hf_error(tmp_path, spm_model, env, wrap=lambda cmd: cmd):
    cmd = [PYTHON, os.path.join(REPO, "tools", "preprocess_c4.py"), "--hf-dataset",
           "no-such-org/no-such-corpus", "--hf-config", "en", "--tokenizer", spm_model,
           "--output-prefix", str(tmp_path / "o")]
    start = time.monotonic()
    result = subprocess.run(wrap(cmd), env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert result.returncode == 2, result.stderr  # bad input (megatron_mixln.errors)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-org/no-such-corpus" in lines[0], result.stderr  # no retry chatter
    assert "--input" in lines[0] and "Traceback" not in result.stderr
    assert seconds < 20, seconds  # at once, not after datasets' ~25 s of retries
    return lines[0]


def test_hugging_face_dataset_offline_is_one_line(tmp_path, spm_model):
    """HF_HUB_OFFLINE (tool_env sets it) is honoured: datasets fails at once, and the line says why."""
    line = _hf_error(tmp_path, spm_model, tool_env())
    assert "could not be loaded" in line and "HF_HUB_OFFLINE is set" in line


def _netns_ok():
    return shutil.which("unshare") and subprocess.run(
        ["unshare", "-n", "bash", "-c", "ip link set lo up"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _netns_ok(), reason="needs `unshare -n` (root) for a machine without network")
def test_hugging_face_dataset_without_network_fails_at_once(tmp_path, spm_model):
    """No HF_HUB_OFFLINE and no network (an empty network namespace: nothing leaves the machine):
    the hub probe fails at once instead of datasets retrying five times."""
    env = {k: v for k, v in tool_env().items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    line = _hf_error(tmp_path, spm_model, env, lambda cmd: ["unshare", "-n"] + cmd)
    assert "cannot reach the hub at huggingface.co:443" in line


def test_truncated_gzip_is_named(tmp_path, corpus, spm_model):
    """A half-downloaded C4 shard: the error names it (and finished shards are kept)."""
    data = file_bytes(corpus["train"][1])
    cut = str(tmp_path / "c4-train.00001-of-00002.json.gz")
    with open(cut, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{cut}: corrupt or truncated \\.gz data"):
        run(tmp_path / "out", [corpus["train"][0], cut], spm_model, workers=1)
    assert len(glob.glob(str(tmp_path / "out.shards" / "*.done"))) == 1


def test_no_documents_at_all_is_an_error(tmp_path, spm_model):
    path = write_lines(tmp_path / "wrong_key.jsonl", [json.dumps({"content": "x"})] * 3)
    with pytest.raises(DataError, match=r"no documents for JSON key 'text' .*'missing_key': 3"):
        run(tmp_path / "out", [path], spm_model)
    assert not glob.glob(str(tmp_path / "out_text_document*"))
    assert not (tmp_path / "out.shards").exists()


def test_an_empty_file_leaves_no_shard_directory(tmp_path, spm_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"no documents for JSON key 'text' .*skipped lines: none"):
        run(tmp_path / "out", [str(empty)], spm_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_a_kill_between_the_final_renames_never_pairs_new_data_with_old_files(tmp_path,
                                                                             monkeypatch):
    """Same document count and token total, other lengths: a new .bin beside the old .idx would
    read back without any error as wrongly cut documents."""
    old = write_lines(tmp_path / "old.jsonl", [json.dumps({"text": "1 2"}),
                                               json.dumps({"text": "3 4 5"})])
    new = write_lines(tmp_path / "new.jsonl", [json.dumps({"text": "7 8 9"}),
                                               json.dumps({"text": "6 5"})])
    prefix = run(tmp_path / "out", [old], "null:100")["text"]["output_prefix"]
    real_replace = os.replace

    def killed_at_the_index_rename(src, dst):
        if dst == prefix + ".idx":
            raise KeyboardInterrupt("simulated kill")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_index_rename)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out", [new], "null:100")
    monkeypatch.undo()
    try:
        ds = IndexedDataset(prefix)
    except DataError as err:
        assert "not found" in str(err)
    else:  # whatever is there must be one consistent run: here, the old one
        assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3, 4, 5]]
    assert not os.path.exists(prefix + ".summary.json")  # it described the old data
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    run(tmp_path / "out", [new], "null:100")  # the rerun finishes the job
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == [[7, 8, 9], [6, 5]]


def test_shards_of_another_end_of_document_id_are_not_resumed_from(tmp_path):
    """A Hugging Face tokenizer's eos comes from tokenizer_config.json, outside tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [f"document number {i} about some things" for i in range(50)]
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200,
                                                       special_tokens=["<unk>", "</s>", "<eot>"]))
    tok.save(str(tok_dir / "tokenizer.json"))
    data = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in texts])
    first = run(tmp_path / "out", [data], str(tok_dir), append_eod=True, keep_shards=True)["text"]
    assert {int(d[-1]) for d in IndexedDataset(first["output_prefix"])} == {1}  # "</s>"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eot>"}))
    second = run(tmp_path / "out", [data], str(tok_dir), append_eod=True, keep_shards=True)["text"]
    assert second["shards"]["reused"] == 0
    assert {int(d[-1]) for d in IndexedDataset(second["output_prefix"])} == {2}  # "<eot>"


def test_an_end_of_document_id_outside_the_vocabulary_is_refused_up_front(tmp_path):
    """A tokenizer.json whose ids have a gap: eos 70000 in a 40-id vocabulary (uint16 output)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [f"document number {i}" for i in range(20)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>"]))
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"]["</s>"] = 70000
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    data = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in texts])
    with pytest.raises(DataError, match=r"--append-eod: .*end-of-document id 70000 .*outside"):
        run(tmp_path / "out", [data], str(tmp_path / "tokenizer.json"), append_eod=True)
    assert not glob.glob(str(tmp_path / "out*"))
