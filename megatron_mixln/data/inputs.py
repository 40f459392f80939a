"""Corpus inputs for the preprocessor: finding the files, cutting them into tasks, reading lines.

A task is one compressed or Parquet file (neither can be entered mid-stream) or one byte range of
a plain JSON-lines file. A byte-range task owns exactly the lines that *start* inside its range,
so consecutive ranges cover every line once whatever the cut points; this is what lets a single
large file be tokenized by several workers and still give the same bytes as one worker.

Containers and encodings, as corpora ship them (each gives the same tokens as the same text in a
plain UTF-8 ``.jsonl``, or is refused with one line naming the file, byte offset and what was found):

  * ``.gz`` (also several concatenated members), ``.zst`` (the Pile, RedPajama, SlimPajama; several
    frames too), ``.xz`` and ``.bz2`` (several streams too), decompressed as a stream;
  * ``.parquet`` (FineWeb and most hub datasets), streamed one record batch at a time, only the
    ``--json-keys`` columns read;
  * a UTF-8 byte-order mark at the start of a file (or of any line, as ``cat`` of such files gives)
    is dropped and counted; UTF-16 and UTF-32 files, with or without a byte-order mark, are decoded
    (one task per file);
  * CRLF line ends, a last line without a newline, and raw control characters (NUL included)
    inside JSON strings are read as the escaped JSON would be.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
from dataclasses import asdict, dataclass
from typing import Iterator

from .errors import DataError

COMPRESSIONS = (".gz", ".zst", ".xz", ".bz2")
PARQUET_SUFFIX = ".parquet"
JSON_SUFFIXES = tuple(base + comp for base in (".json", ".jsonl") for comp in ("",) + COMPRESSIONS)
INPUT_SUFFIXES = JSON_SUFFIXES + (PARQUET_SUFFIX,)
UTF8_BOM = codecs.BOM_UTF8
_GLOB_CHARS = set("*?[")
# Byte-order marks, longest first (the UTF-32-LE mark starts with the UTF-16-LE one).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
         (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by ``patterns`` (paths, globs or directories), in order, each listed once.

    Globs and directories expand in sorted order so the output does not depend on the filesystem.
    Raises DataError naming the pattern or file when nothing matches or a file is not an input.
    """
    files: list[str] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataError(f"--input {pattern!r}: the pattern matches no files")
        elif os.path.isdir(pattern):
            matches = sorted(os.path.join(pattern, n) for n in os.listdir(pattern)
                             if n.endswith(INPUT_SUFFIXES))
            if not matches:
                raise DataError(f"--input {pattern!r}: directory holds no JSON-lines "
                                f"(.json/.jsonl, optionally {'/'.join(COMPRESSIONS)}) or "
                                f"{PARQUET_SUFFIX} files")
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            raise DataError(f"--input {pattern!r}: no such file")
        for path in matches:
            path = os.path.abspath(path)
            if not path.endswith(INPUT_SUFFIXES):
                raise DataError(f"{path}: expected JSON lines (.json/.jsonl, optionally compressed "
                                f"as {'/'.join(COMPRESSIONS)}) or {PARQUET_SUFFIX}")
            if not os.access(path, os.R_OK) or not os.path.isfile(path):
                raise DataError(f"{path}: not a readable file")
            if path not in files:
                files.append(path)
    return files


def compression_of(path: str) -> str | None:
    """The compression suffix of ``path`` ('.gz', '.zst', '.xz', '.bz2') or None."""
    return next((c for c in COMPRESSIONS if path.endswith(c)), None)


def open_stream(path: str, raw, buffer_bytes: int = 1 << 20) -> io.BufferedIOBase:
    """The decompressed bytes of ``raw`` (an open binary file of ``path``), chosen by suffix,
    read ahead ``buffer_bytes`` at a time."""
    compression = compression_of(path)
    if compression == ".gz":  # GzipFile reads every member of a multi-member file
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
    elif compression == ".zst":
        stream = _ZstdFrames(raw, path)
    elif compression == ".xz":  # every stream of a multi-stream file
        stream = lzma.LZMAFile(raw)
    elif compression == ".bz2":
        stream = bz2.BZ2File(raw)
    else:
        return raw
    return io.BufferedReader(stream, buffer_bytes)


class _ZstdFrames(io.RawIOBase):
    """zstd frames one after another (pzstd and zstd -T write several), as one byte stream.

    zstandard's own ``stream_reader`` ends silently at a cut frame; this one raises ZstdError so a
    truncated download is never taken for a complete file. Each frame is decoded with the window its
    header declares (``zstd --long=31`` writes 2 GiB windows; the library's default limit is 128 MiB)
    up to zstd's own maximum, 2**WINDOWLOG_MAX bytes; a frame declaring more is refused with a
    DataError naming the file, the frame's byte offset and its window.
    """

    def __init__(self, raw, path: str = "<zstd stream>") -> None:
        import zstandard

        self._zstd, self._raw, self._path = zstandard, raw, path
        self._max_window = 1 << zstandard.WINDOWLOG_MAX
        self._frame = self._new_frame()
        self._pending, self._in_frame = b"", False
        self._frame_start, self._frame_head, self._offset = 0, b"", 0

    def _new_frame(self):
        return self._zstd.ZstdDecompressor(max_window_size=self._max_window).decompressobj()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise self._zstd.ZstdError("the last frame is cut short (truncated file)")
                return 0
            while chunk:
                if not self._in_frame:
                    self._frame_start, self._frame_head = self._offset, b""
                self._in_frame = True
                self._frame_head = (self._frame_head + chunk[:18])[:18]  # the longest frame header
                self._offset += len(chunk)
                try:
                    self._pending += self._frame.decompress(chunk)
                except self._zstd.ZstdError:
                    self._refuse_window()
                    raise
                chunk = b""
                if self._frame.eof:  # frame done: the rest of the chunk starts the next one
                    chunk = self._frame.unused_data
                    self._offset -= len(chunk)
                    self._frame = self._new_frame()
                    self._in_frame = False
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _refuse_window(self) -> None:
        """Raise DataError when the failing frame declares a window larger than zstd decodes."""
        window = zstd_window_size(self._frame_head)
        if window is not None and window > self._max_window:
            log = window.bit_length() - 1
            raise DataError(
                f"{self._path}: the zstd frame at byte {self._frame_start} declares a {window / 2**30:g} GiB window "
                f"(zstd --long={log}); zstd decodes windows up to {self._max_window / 2**30:g} GiB "
                f"(--long={self._zstd.WINDOWLOG_MAX}): recompress it with zstd --long={self._zstd.WINDOWLOG_MAX} or less")


def zstd_window_size(header: bytes) -> int | None:
    """The window a zstd frame declares, in bytes, from its first bytes (RFC 8878 section 3.1.1.1.2:
    Window_Descriptor, windowLog = 10 + Exponent, plus Mantissa eighths), or None when ``header`` is
    no zstd frame or declares no window (a single-segment frame: the window is its content)."""
    if len(header) < 6 or header[:4] != b"\x28\xb5\x2f\xfd" or header[4] & 0x20:
        return None
    exponent, mantissa = header[5] >> 3, header[5] & 7
    base = 1 << (10 + exponent)
    return base + (base // 8) * mantissa


def decompression_errors() -> tuple[type[BaseException], ...]:
    """Exception types a corrupt or truncated compressed stream raises."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def sniff_encoding(head: bytes) -> str | None:
    """The text encoding of a JSON-lines file from its first bytes: 'utf-8', 'utf-8-sig' (BOM),
    'utf-16-le'/'-be' or 'utf-32-le'/'-be' (with or without their BOM, found by where the NUL
    bytes of the first ASCII characters fall), or None when nothing fits JSON text."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return "utf-8-sig" if name == "utf-8" else name
    b = head[:4]
    if len(b) == 4 and b[0] and not any(b[1:]):
        return "utf-32-le"
    if len(b) == 4 and not any(b[:3]) and b[3]:
        return "utf-32-be"
    if len(b) >= 2 and b[0] and not b[1]:
        return "utf-16-le"
    if len(b) >= 2 and not b[0] and b[1]:
        return "utf-16-be"
    if b"\x00" in b:
        return None
    return "utf-8"


def _parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except Exception as err:  # noqa: BLE001 -- pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None


def check_input(path: str, json_keys: list[str] | tuple[str, ...] = ("text",)) -> str:
    """Cheap sniff so that a JSON array, a binary file or a Parquet file without the key fails up
    front, not as N bad lines. Returns the file's text encoding (see ``sniff_encoding``;
    'parquet' for Parquet). Raises DataError naming the file, the byte offset and what was found.
    """
    if path.endswith(PARQUET_SUFFIX):
        columns = _parquet_columns(path)
        missing = [k for k in json_keys if k not in columns]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} for --json-keys (columns: "
                            f"{', '.join(columns)})")
        return "parquet"
    try:
        with open(path, "rb") as raw:
            head = open_stream(path, raw, buffer_bytes=64).read(64)
    except decompression_errors() as err:
        what = f"corrupt or truncated {compression_of(path)} data" if compression_of(path) else \
            "cannot be read"
        raise DataError(f"{path}: {what} ({type(err).__name__}: {err})") from None
    encoding = sniff_encoding(head)
    if encoding is None:
        nul = head.index(b"\x00")
        raise DataError(f"{path}: byte {nul}: found a NUL byte in {head[:16]!r}...; expected JSON "
                        f"lines (UTF-8, UTF-16 or UTF-32 text)")
    text = head.decode(encoding, errors="ignore").lstrip("\ufeff").lstrip()
    if text.startswith("["):
        raise DataError(f"{path}: looks like one JSON array; expected JSON lines (one object per "
                        f"line, as C4's files)")
    if text and not text.startswith("{"):
        offset = len(head) - len(head.lstrip())
        raise DataError(f"{path}: byte {offset}: found {head[offset:offset + 16]!r}; expected "
                        f"JSON lines starting with '{{'")
    return encoding


@dataclass(frozen=True)
class Task:
    """A unit of work: lines of ``path`` starting in ``[start, end)``, or a Hugging Face shard."""

    ordinal: int
    path: str  # file path, or the Hugging Face dataset name
    size: int
    mtime_ns: int
    start: int = 0
    end: int | None = None  # None: to the end of the file
    hf: dict | None = None  # {"config", "split", "shard", "num_shards"} for Hugging Face input
    encoding: str = "utf-8"  # from check_input: utf-8, utf-8-sig, utf-16-le/be, utf-32-le/be, parquet

    def identity(self, settings_hash: str) -> str:
        """Changes when the input file, the range or the settings change (resume key)."""
        fields = asdict(self)
        fields.pop("ordinal")
        blob = json.dumps([fields, settings_hash], sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:20]

    def describe(self) -> str:
        if self.hf is not None:
            return f"{self.path}[{self.hf['split']}] shard {self.hf['shard']}/{self.hf['num_shards']}"
        if self.start == 0 and self.end is None:
            return self.path
        return f"{self.path} bytes {self.start}..{self.end if self.end is not None else 'end'}"


def plan_file_tasks(files: list[str], chunk_bytes: int,
                    encodings: dict[str, str] | None = None) -> list[Task]:
    """Plain UTF-8 files above ``chunk_bytes`` are cut into byte ranges; every other file
    (compressed, Parquet, UTF-16/32) is one task. ``encodings``: ``check_input``'s per file."""
    tasks: list[Task] = []
    for path in files:
        stat = os.stat(path)
        encoding = (encodings or {}).get(path, "utf-8")
        splittable = compression_of(path) is None and encoding in ("utf-8", "utf-8-sig")
        if not splittable or stat.st_size <= chunk_bytes:
            ranges = [(0, None)]
        else:
            cuts = list(range(0, stat.st_size, chunk_bytes))
            ranges = [(s, e) for s, e in zip(cuts, cuts[1:] + [None])]
        for start, end in ranges:
            tasks.append(Task(len(tasks), path, stat.st_size, stat.st_mtime_ns, start, end,
                              encoding=encoding))
    return tasks


class LineReader:
    """Iterate ``(line number within the task, raw UTF-8 line bytes)``.

    ``position`` is the number of input bytes (compressed for compressed files) consumed so far,
    for progress reporting; ``line_offset`` the byte offset of the current line (in the
    decompressed, UTF-8 text for compressed or UTF-16/32 files); ``boms`` the number of UTF-8
    byte-order marks dropped from line starts.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.position = task.start
        self.first_line_offset = task.start  # byte offset of the first line this task owns
        self.line_offset = task.start
        self.boms = 0

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        with open(self.task.path, "rb", buffering=1 << 20) as raw:
            if compression_of(self.task.path) is None and self.task.encoding.startswith("utf-8"):
                lines = self._range_lines(raw)
            else:
                lines = self._stream_lines(raw)
            for lineno, line in lines:
                if line.startswith(UTF8_BOM):  # Notepad/PowerShell files, and cat of them
                    line = line[len(UTF8_BOM):]
                    self.boms += 1
                yield lineno, line

    def _stream_lines(self, raw) -> Iterator[tuple[int, bytes]]:
        path, encoding = self.task.path, self.task.encoding
        try:
            with open_stream(path, raw) as fh:
                if encoding.startswith("utf-8"):
                    lines = iter(fh)
                else:  # newline="" keeps CRLF as it is, like the binary path
                    lines = (t.encode("utf-8") for t in io.TextIOWrapper(fh, encoding, newline=""))
                offset = 0
                for lineno, line in enumerate(lines, 1):
                    self.position, self.line_offset = raw.tell(), offset
                    offset += len(line)
                    yield lineno, line
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: invalid {encoding} text after byte {self.line_offset} of "
                            f"the decoded stream ({err.reason})") from None
        except decompression_errors() as err:
            raise DataError(f"{path}: corrupt or truncated {compression_of(path)} data "
                            f"({type(err).__name__}: {err})") from None
        self.position = self.task.size

    def _range_lines(self, fh) -> Iterator[tuple[int, bytes]]:
        pos = self.task.start
        if pos > 0:
            # Skip the rest of the line that started before our range (its owner reads it).
            fh.seek(pos - 1)
            pos = pos - 1 + len(fh.readline())
        self.first_line_offset = pos
        end = self.task.end
        lineno = 0
        while end is None or pos < end:
            line = fh.readline()
            if not line:
                break
            self.line_offset = pos
            pos += len(line)
            lineno += 1
            self.position = pos
            yield lineno, line


class ParquetReader:
    """Iterate ``(row number, {column: value})`` of a Parquet file, one record batch of the
    ``columns`` at a time (memory stays flat whatever the file size); same interface as
    ``LineReader``."""

    def __init__(self, task: Task, columns: list[str] | tuple[str, ...], batch_rows: int = 1024):
        self.task, self.columns, self.batch_rows = task, list(columns), batch_rows
        self.position = self.first_line_offset = self.line_offset = self.boms = 0

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.task.path)
        total = max(pf.metadata.num_rows, 1)
        row = 0
        for batch in pf.iter_batches(batch_size=self.batch_rows, columns=self.columns):
            values = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
            for record in zip(*values):
                row += 1
                self.position = self.task.size * row // total
                yield row, dict(zip(batch.schema.names, record))


def count_newlines(path: str, end: int) -> int:
    """Newlines in bytes ``[0, end)`` of a plain file: the line number of the line starting at
    ``end`` is this plus one (used to report absolute line numbers from a byte-range task)."""
    count, left = 0, end
    with open(path, "rb") as fh:
        while left > 0:
            block = fh.read(min(left, 1 << 20))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count
