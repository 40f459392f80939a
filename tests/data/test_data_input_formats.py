"""Corpora as they ship: byte-order marks, UTF-16/32, CRLF, control characters, zstd/xz/bz2 and
multi-member gzip, Parquet. Each is checked against the same text given as plain UTF-8 JSON lines:
the .bin/.idx bytes must be identical, or the file is refused with one line naming it, the byte
offset and what was found."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os

import pytest

from data_testlib import file_bytes, read_jsonl_texts
from megatron_mixln.data.errors import BadInputError, DataError
from megatron_mixln.data.preprocess import PreprocessOptions, run_preprocess

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def texts(corpus) -> list[str]:
    """Real documents plus characters outside the BMP (surrogate pairs in UTF-16)."""
    docs = read_jsonl_texts(corpus["train"][:1])[:40]
    return docs + ["emoji \U0001F600 and \u00e9\u4e2d\u6587", "tab\there, quote \" and \\ back"]


def _lines(texts) -> list[bytes]:
    return [json.dumps({"text": t, "id": i}, ensure_ascii=False).encode("utf-8")
            for i, t in enumerate(texts)]


def _write(path, data: bytes) -> str:
    with open(path, "wb") as fh:
        fh.write(data)
    return str(path)


def _run(tmp_path, name, inputs, spm_model, **kw) -> tuple[bytes, bytes, dict]:
    opts = dict(output_prefix=str(tmp_path / name), tokenizer=spm_model, inputs=list(inputs),
                append_eod=True, workers=1, progress=False)
    opts.update(kw)
    summary = run_preprocess(PreprocessOptions(**opts))["text"]
    return file_bytes(summary["bin"]), file_bytes(summary["idx"]), summary


@pytest.fixture(scope="module")
def reference(tmp_path_factory, texts, spm_model):
    """The plain UTF-8 JSON-lines path: what every other container must reproduce."""
    tmp = tmp_path_factory.mktemp("plain")
    path = _write(tmp / "plain.jsonl", b"\n".join(_lines(texts)) + b"\n")
    return _run(tmp, "plain", [path], spm_model)


def _same_as_reference(result, reference):
    assert result[0] == reference[0], ".bin differs from the plain UTF-8 JSON-lines path"
    assert result[1] == reference[1], ".idx differs from the plain UTF-8 JSON-lines path"


def test_utf8_byte_order_mark_is_read_and_counted(tmp_path, texts, spm_model, reference):
    data = b"\xef\xbb\xbf" + b"\n".join(_lines(texts)) + b"\n"
    result = _run(tmp_path, "bom", [_write(tmp_path / "bom.jsonl", data)], spm_model)
    _same_as_reference(result, reference)
    assert result[2]["utf8_boms_dropped"] == 1
    assert result[2]["inputs"][0]["encoding"] == "utf-8-sig"
    assert not result[2]["skipped"]


def test_byte_order_marks_inside_a_file_as_cat_makes_them(tmp_path, texts, spm_model, reference):
    lines = _lines(texts)
    half = len(lines) // 2
    data = (b"\xef\xbb\xbf" + b"\n".join(lines[:half]) + b"\n"
            + b"\xef\xbb\xbf" + b"\n".join(lines[half:]) + b"\n")
    path = _write(tmp_path / "cat.jsonl", data)
    result = _run(tmp_path, "cat", [path], spm_model)
    _same_as_reference(result, reference)
    assert result[2]["utf8_boms_dropped"] == 2
    # Cut into byte ranges, every chunk still drops the marks at its own line starts.
    chunked = _run(tmp_path, "cat_chunks", [path], spm_model, workers=2, chunk_mb=1e-3)
    _same_as_reference(chunked, reference)
    assert chunked[2]["utf8_boms_dropped"] == 2 and chunked[2]["shards"]["total"] > 2


@pytest.mark.parametrize("encoding, bom", [
    ("utf-16-le", True), ("utf-16-be", True), ("utf-16-le", False), ("utf-16-be", False),
    ("utf-32-le", True), ("utf-32-be", True), ("utf-32-le", False), ("utf-32-be", False)])
def test_utf16_and_utf32_files_are_decoded(tmp_path, texts, spm_model, reference, encoding, bom):
    text = "\n".join(line.decode("utf-8") for line in _lines(texts)) + "\r\n"
    data = (("\ufeff" if bom else "") + text).encode(encoding)
    path = _write(tmp_path / "wide.jsonl", data)
    result = _run(tmp_path, "wide", [path], spm_model)
    _same_as_reference(result, reference)
    assert result[2]["inputs"][0]["encoding"] == encoding
    assert result[2]["utf8_boms_dropped"] == int(bom)


def test_invalid_utf16_is_refused_with_the_offset(tmp_path, texts, spm_model):
    data = "\n".join(l.decode() for l in _lines(texts[:3])).encode("utf-16-le") + b"\x00\xd8{\x00"
    path = _write(tmp_path / "broken16.jsonl", data)
    with pytest.raises(DataError, match=r"broken16.jsonl: invalid utf-16-le text after byte \d+"):
        _run(tmp_path, "broken16", [path], spm_model)


def test_crlf_and_a_last_line_without_newline(tmp_path, texts, spm_model, reference):
    data = b"\r\n".join(_lines(texts))  # no line end after the last line
    result = _run(tmp_path, "crlf", [_write(tmp_path / "crlf.jsonl", data)], spm_model)
    _same_as_reference(result, reference)
    assert not result[2]["skipped"]


def test_control_characters_inside_strings_read_as_their_escapes(tmp_path, spm_model):
    texts = ["a NUL \x00 inside", "bell \x07 and escape \x1b[0m", "form\x0cfeed and \x7f"]
    escaped = b"\n".join(json.dumps({"text": t}).encode() for t in texts) + b"\n"
    raw = b"\n".join(b'{"text": "' + t.encode() + b'"}' for t in texts) + b"\n"
    assert b"\x00" in raw and b"\\u0000" in escaped
    want = _run(tmp_path, "escaped", [_write(tmp_path / "escaped.jsonl", escaped)], spm_model)
    got = _run(tmp_path, "raw", [_write(tmp_path / "raw.jsonl", raw)], spm_model)
    _same_as_reference(got, want)
    assert not got[2]["skipped"]


def test_a_nul_byte_outside_a_string_names_the_byte_offset(tmp_path, texts, spm_model):
    lines = _lines(texts[:4])
    bad = b'{"text": "ok"}\x00\x00'
    data = b"\n".join(lines[:2] + [bad] + lines[2:]) + b"\n"
    offset = len(b"\n".join(lines[:2])) + 1 + bad.index(b"\x00")
    path = _write(tmp_path / "nul.jsonl", data)
    summary = _run(tmp_path, "nul", [path], spm_model)[2]
    (example,) = summary["skipped"]["malformed_json"]["examples"]
    assert example.startswith(f"{path}:3: ") and f"NUL byte at byte {offset} of the file" in example
    with pytest.raises(BadInputError, match=rf"nul.jsonl:3: malformed json: .*NUL byte at byte "
                                            rf"{offset} of the file"):
        _run(tmp_path, "nul_strict", [path], spm_model, strict=True)


def test_a_file_of_nul_bytes_is_refused_before_any_work(tmp_path, spm_model):
    path = _write(tmp_path / "zeros.jsonl", b"\x00" * 4096)
    with pytest.raises(DataError, match=r"zeros.jsonl: byte 0: found a NUL byte"):
        _run(tmp_path, "zeros", [path], spm_model)
    assert not os.path.exists(tmp_path / "zeros.shards")


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


# Each compressor applied to two halves separately and concatenated: several gzip members,
# zstd frames, xz streams, bz2 streams -- as parallel compressors (pigz, pzstd, pbzip2) write them.
COMPRESSORS = {".gz": lambda d: gzip.compress(d, mtime=0), ".zst": _zstd, ".xz": lzma.compress,
               ".bz2": bz2.compress}


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_compressed_files_in_several_members(tmp_path, texts, spm_model, reference, suffix):
    lines = _lines(texts)
    half = len(lines) // 2
    first, second = (b"\n".join(part) + b"\n" for part in (lines[:half], lines[half:]))
    compress = COMPRESSORS[suffix]
    path = _write(tmp_path / f"corpus.jsonl{suffix}", compress(first) + compress(second))
    result = _run(tmp_path, "compressed", [path], spm_model)
    _same_as_reference(result, reference)
    assert result[2]["inputs"][0]["compression"] == suffix


def test_compressed_files_keep_parallel_resumable_deterministic_output(tmp_path, texts, spm_model):
    lines = _lines(texts)
    parts = [lines[i::3] for i in range(3)]
    plain = [_write(tmp_path / f"p{i}.jsonl", b"\n".join(p) + b"\n") for i, p in enumerate(parts)]
    packed = [_write(tmp_path / f"c{i}.jsonl{s}", COMPRESSORS[s](b"\n".join(p) + b"\n"))
              for i, (p, s) in enumerate(zip(parts, (".zst", ".xz", ".bz2")))]
    want = _run(tmp_path, "plain3", plain, spm_model)
    got = _run(tmp_path, "packed3", packed, spm_model, workers=2, keep_shards=True)
    _same_as_reference(got, want)
    # Resume: drop one finished shard's manifest; the rerun redoes only that file.
    shard_dir = tmp_path / "packed3.shards"
    done = sorted(p for p in os.listdir(shard_dir) if p.endswith(".done"))
    assert len(done) == 3
    os.remove(shard_dir / done[0])
    again = _run(tmp_path, "packed3", packed, spm_model, workers=2)
    _same_as_reference(again, want)
    assert again[2]["shards"] == {"total": 3, "used": 3, "reused": 2, "processed": 1}


@pytest.mark.parametrize("suffix", [".zst", ".xz", ".bz2", ".gz"])
def test_truncated_compressed_file_names_the_file(tmp_path, texts, spm_model, suffix):
    data = COMPRESSORS[suffix](b"\n".join(_lines(texts * 20)) + b"\n")
    path = _write(tmp_path / f"cut.jsonl{suffix}", data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=rf"cut.jsonl\{suffix}: corrupt or truncated"):
        _run(tmp_path, "cut", [path], spm_model)


def _zstd_long_window(data: bytes, window_log: int = 31) -> bytes:
    """What `zstd --long=31` writes for a stream: long-distance matching, a 2 GiB window declared
    in the frame header (no content size, so the window is not shrunk to fit the data)."""
    import io

    import zstandard

    params = zstandard.ZstdCompressionParameters(window_log=window_log, enable_ldm=True)
    out = io.BytesIO()
    writer = zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False)
    writer.write(data)
    writer.flush(zstandard.FLUSH_FRAME)
    return out.getvalue()


def test_long_window_zstd_gives_the_plain_bytes(tmp_path, texts, spm_model, reference):
    import zstandard

    lines = _lines(texts)
    half = len(lines) // 2
    first, second = (b"\n".join(part) + b"\n" for part in (lines[:half], lines[half:]))
    frames = _zstd_long_window(first) + _zstd_long_window(second)
    assert zstandard.get_frame_parameters(frames).window_size == 2**31  # beyond the library's default limit
    path = _write(tmp_path / "long.jsonl.zst", frames)
    _same_as_reference(_run(tmp_path, "long", [path], spm_model), reference)


def test_zstd_window_beyond_zstds_maximum_is_named(tmp_path, texts, spm_model):
    first = _zstd(b"\n".join(_lines(texts[:3])) + b"\n")
    second = bytearray(_zstd_long_window(b"\n".join(_lines(texts[3:6])) + b"\n"))
    # Frame header: 4 magic bytes, the descriptor, then the window descriptor (exponent << 3):
    # windowLog = 10 + exponent; 31 -> 32, one more than any zstd decodes.
    assert second[5] >> 3 == 21
    second[5] = 22 << 3
    path = _write(tmp_path / "huge.jsonl.zst", first + bytes(second))
    with pytest.raises(DataError, match=rf"huge.jsonl.zst: the zstd frame at byte {len(first)} declares a 4 GiB "
                                        r"window \(zstd --long=32\); zstd decodes windows up to 2 GiB \(--long=31\)"):
        _run(tmp_path, "huge", [path], spm_model)


def test_parquet_input_streams_row_groups(tmp_path, texts, spm_model, reference):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), "text": texts,
                      "url": [f"https://example.invalid/{i}" for i in range(len(texts))]})
    os.makedirs(tmp_path / "hub")
    path = str(tmp_path / "hub" / "fineweb.parquet")
    pq.write_table(table, path, row_group_size=7)  # several row groups, read batch by batch
    assert pq.ParquetFile(path).num_row_groups > 1
    result = _run(tmp_path, "parquet", [path], spm_model)
    _same_as_reference(result, reference)
    assert result[2]["inputs"][0]["encoding"] == "parquet"
    # A directory holding Parquet files is expanded like one of JSON lines.
    _same_as_reference(_run(tmp_path, "parquet_dir", [str(tmp_path / "hub")], spm_model),
                       reference)


def test_parquet_without_the_key_and_a_bad_parquet_file(tmp_path, spm_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "other.parquet")
    pq.write_table(pa.table({"content": ["a b c"]}), path)
    with pytest.raises(DataError, match=r"other.parquet: no column 'text' for --json-keys "
                                        r"\(columns: content\)"):
        _run(tmp_path, "other", [path], spm_model)
    broken = _write(tmp_path / "broken.parquet", b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken.parquet: not a readable Parquet file"):
        _run(tmp_path, "broken", [broken], spm_model)


@pytest.mark.parametrize("suffix", [".zst", ".xz", ".bz2", ".parquet"])
def test_tokenizer_training_reads_the_same_containers(tmp_path, texts, suffix):
    """tools/train_tokenizer.py sees the same text from every container the preprocessor reads."""
    from megatron_mixln.data.tokenizer_training import iter_text_lines

    plain = _write(tmp_path / "plain.jsonl", b"\n".join(_lines(texts)) + b"\n")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        other = str(tmp_path / "t.parquet")
        pq.write_table(pa.table({"text": texts}), other, row_group_size=5)
    else:
        other = _write(tmp_path / f"t.jsonl{suffix}", COMPRESSORS[suffix](b"\xef\xbb\xbf" + open(plain, "rb").read()))
    want = list(iter_text_lines([plain], ["text"]))
    assert want and list(iter_text_lines([other], ["text"])) == want
