"""Tokenize one task (a file, a byte range of one, or a Hugging Face shard) into shard files.

Runs in a worker process (the tokenizer is loaded once per process by ``init_worker``). Per JSON
key it writes ``<shard dir>/<task id>_<key>.bin/.idx`` and finally ``<task id>.done``: a manifest
with the counts and skipped-line examples. The manifest is written last and atomically, so its
presence means the shard is complete -- that is what a resumed run trusts.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from .errors import BadInputError, TokenizerError
from megatron_mixln.fileio import atomic_write_json
from .hf_input import HFRecordReader
from .indexed_writer import IndexedDatasetWriter
from .inputs import PARQUET_SUFFIX, LineReader, ParquetReader, Task, count_newlines
from .tokenizer import Tokenizer
from .tokenizer_backends import TokenizerMismatchError, build_encoder

MAX_EXAMPLES = 5  # skipped-line examples kept per reason
_BATCH_CHARS = 2 << 20  # encode when a key's pending text reaches this many characters
_REPORT_EVERY = 2048  # lines between progress reports


@dataclass(frozen=True)
class ShardSettings:
    tokenizer: str
    json_keys: tuple[str, ...]
    append_eod: bool
    strict: bool
    dtype: str
    max_docs: int | None
    shard_dir: str
    settings_hash: str
    batch_docs: int = 1024
    tokenizer_backend: str = "sentencepiece"  # as select_backend resolved it: never "auto" here
    verify_fraction: float = 0.0


def shard_prefix(shard_dir: str, task_id: str, key: str) -> str:
    return os.path.join(shard_dir, f"{task_id}_{key}")


def manifest_path(shard_dir: str, task_id: str) -> str:
    return os.path.join(shard_dir, f"{task_id}.done")


_STATE: dict[str, Any] = {}
_DECODER = json.JSONDecoder(strict=False)  # one decoder: json.loads(..., strict=False) builds one per call


def init_worker(settings: ShardSettings, progress: Callable[[tuple], None] | None) -> None:
    """Per-process setup: load the tokenizer (with its backend) once; ``progress`` receives
    (bytes, docs, tokens)."""
    _STATE["tokenizer"] = build_encoder(settings.tokenizer, settings.tokenizer_backend,
                                        settings.verify_fraction)
    _STATE["progress"] = progress


class _Location:
    """Turns a line number within the task into ``file:line`` (absolute, for error messages)."""

    def __init__(self, task: Task, reader) -> None:
        self.task, self.reader = task, reader
        self._base: int | None = None

    def __call__(self, lineno: int) -> str:
        task = self.task
        if task.hf is not None:
            return f"{task.describe()}: example {lineno}"
        if task.encoding == "parquet":
            return f"{task.path}: row {lineno}"
        if self._base is None:
            self._base = (count_newlines(task.path, self.reader.first_line_offset)
                          if task.start else 0)
        return f"{task.path}:{self._base + lineno}"


def _control_characters(line: bytes, offset: int) -> str:
    """' (NUL byte at byte N)' for the first C0 control byte of a line that is no line end."""
    for i, byte in enumerate(line.rstrip(b"\r\n")):
        if byte < 0x20 and byte not in (0x09,):
            name = "NUL byte" if byte == 0 else f"control byte 0x{byte:02x}"
            return f" ({name} at byte {offset + i} of the file)"
    return ""


def _parse(record, offset: int = 0) -> tuple[dict | None, str, str]:
    """(object, reason, detail): a JSON line as a dict, or why it cannot be used.

    Raw control characters (NUL included) inside JSON strings are accepted (``strict=False``):
    they give the same text as their ``\\u00XX`` escapes. ``offset``: the line's byte offset, named
    in the detail of a line that a control byte outside a string makes unparsable.
    """
    if isinstance(record, dict):  # Hugging Face and Parquet examples arrive parsed
        return record, "", ""
    try:
        text = record.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, "invalid_utf8", f"byte {offset + err.start} of the file: {err.reason}"
    if not text.strip():
        return None, "blank_line", ""
    try:
        obj = _DECODER.decode(text)
    except json.JSONDecodeError as err:
        return None, "malformed_json", (err.msg + f" (column {err.colno})"
                                        + _control_characters(record, offset))
    if not isinstance(obj, dict):
        return None, "not_an_object", f"a JSON {type(obj).__name__}"
    return obj, "", ""


class _KeyOutput:
    """Pending texts, shard writer and statistics of one JSON key."""

    def __init__(self, key: str, writer: IndexedDatasetWriter, settings: ShardSettings,
                 tokenizer: Tokenizer, where: _Location) -> None:
        self.key, self.writer, self.settings, self.tok, self.where = (
            key, writer, settings, tokenizer, where)
        self.texts: list[str] = []
        self.linenos: list[int] = []
        self.chars = 0
        self.docs = self.tokens = 0
        self.skipped: Counter = Counter()
        self.examples: dict[str, list] = {}

    def skip(self, reason: str, lineno: int, detail: str) -> None:
        if self.settings.strict and reason != "blank_line":
            raise BadInputError(f"{self.where(lineno)}: {reason.replace('_', ' ')}"
                                f"{' (key ' + repr(self.key) + ')' if 'key' in reason else ''}"
                                f"{': ' + detail if detail else ''} (--strict)")
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append([lineno, detail[:200]])

    def add(self, value: Any, lineno: int) -> None:
        if value is _MISSING:
            return self.skip("missing_key", lineno, f"no {self.key!r} field")
        if not isinstance(value, str):
            return self.skip("not_a_string", lineno, f"{self.key!r} is a {type(value).__name__}")
        if not value.strip():
            return self.skip("empty_text", lineno, f"{self.key!r} is empty or whitespace")
        self.texts.append(value)
        self.linenos.append(lineno)
        self.chars += len(value)
        if len(self.texts) >= self.settings.batch_docs or self.chars >= _BATCH_CHARS:
            self.flush()

    def _encode(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(ids, lengths, line numbers) of the pending texts that encode; the others are skipped."""
        try:
            return (*self.tok.encode_flat(self.texts), self.linenos)
        except TokenizerMismatchError as err:
            raise TokenizerError(f"{self.where(self.linenos[err.index])}: {err}") from None
        except Exception:  # noqa: BLE001 -- find the culprit(s) one by one, below
            pass
        parts, lengths, linenos = [], [], []
        for text, lineno in zip(self.texts, self.linenos):
            try:
                flat, length = self.tok.encode_flat([text])
            except TokenizerMismatchError as err:
                raise TokenizerError(f"{self.where(lineno)}: {err}") from None
            except Exception as err:  # noqa: BLE001 -- e.g. lone surrogates from "\udc80" escapes
                self.skip("unencodable_text", lineno, f"{type(err).__name__}: {err}")
                continue
            parts.append(flat)
            lengths.append(length)
            linenos.append(lineno)
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), []
        return np.concatenate(parts), np.concatenate(lengths), linenos

    def flush(self) -> None:
        if not self.texts:
            return
        flat, lengths, linenos = self._encode()
        self.texts, self.linenos, self.chars = [], [], 0
        empty = np.flatnonzero(lengths == 0)
        for i in empty:
            self.skip("no_tokens", linenos[i], "the text encodes to zero tokens")
        if len(empty):
            keep = lengths > 0
            lengths, linenos = lengths[keep], [n for n, k in zip(linenos, keep) if k]
        if not len(lengths):
            return
        self._check_ids(flat, lengths, linenos)
        if self.settings.append_eod:
            flat, lengths = _append_eod(flat, lengths, self.tok.eod)
        self.writer.add_documents(flat.astype(self.settings.dtype), lengths)
        self.docs += len(lengths)
        self.tokens += int(lengths.sum())

    def _check_ids(self, flat: np.ndarray, lengths: np.ndarray, linenos: list[int]) -> None:
        """Ids outside the vocabulary or the dtype would be silently wrapped by astype: refuse."""
        info = np.iinfo(self.settings.dtype)
        limit = min(self.tok.vocab_size - 1, info.max)
        bad = np.flatnonzero((flat < 0) | (flat > limit))
        if not len(bad):
            return
        value = int(flat[bad[0]])
        doc = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
        problems = []
        if not 0 <= value < self.tok.vocab_size:
            problems.append(f"outside the tokenizer's vocabulary 0..{self.tok.vocab_size - 1}")
        if not info.min <= value <= info.max:
            problems.append(f"does not fit the output dtype {self.settings.dtype}")
        raise TokenizerError(f"{self.where(linenos[doc])}: token id {value} from "
                             f"{self.tok.name} is {' and '.join(problems)}")


def _append_eod(flat: np.ndarray, lengths: np.ndarray, eod: int) -> tuple[np.ndarray, np.ndarray]:
    """Insert ``eod`` after every document of the concatenation ``flat`` (vectorized)."""
    lengths = lengths + 1
    out = np.empty(len(flat) + len(lengths), np.int64)
    eod_at = np.cumsum(lengths) - 1
    is_token = np.ones(len(out), bool)
    is_token[eod_at] = False
    out[is_token] = flat
    out[eod_at] = eod
    return out, lengths


_MISSING = object()


def _open_reader(task: Task, json_keys: tuple[str, ...]):
    if task.hf is not None:
        return HFRecordReader(task)
    if task.path.endswith(PARQUET_SUFFIX):
        return ParquetReader(task, json_keys)
    return LineReader(task)


def task_texts(task: Task, key: str) -> Iterator[str]:
    """The texts of ``key`` that ``process_task`` would encode, in order (bad lines dropped)."""
    for _, record in _open_reader(task, (key,)):
        obj = _parse(record)[0]
        value = obj.get(key) if obj is not None else None
        if isinstance(value, str) and value.strip():
            yield value


def process_task(task: Task, settings: ShardSettings) -> dict:
    """Tokenize ``task`` into its shard files and return (and write) its manifest."""
    started = time.time()
    tok: Tokenizer = _STATE["tokenizer"]
    progress = _STATE.get("progress")
    task_id = task.identity(settings.settings_hash)
    reader = _open_reader(task, settings.json_keys)
    where = _Location(task, reader)
    outputs = {key: _KeyOutput(key, IndexedDatasetWriter(
        shard_prefix(settings.shard_dir, task_id, key), settings.dtype), settings, tok, where)
        for key in settings.json_keys}
    lines, reported = 0, [task.start, 0, 0]
    checks_before = (getattr(tok, "verified", 0), getattr(tok, "routed", 0))

    def report() -> None:
        if progress is not None:
            first = outputs[settings.json_keys[0]]
            progress((reader.position - reported[0], first.docs - reported[1],
                      first.tokens - reported[2]))
            reported[:] = [reader.position, first.docs, first.tokens]

    try:
        for lineno, record in reader:
            lines = lineno
            obj, reason, detail = _parse(record, getattr(reader, "line_offset", 0))
            for out in outputs.values():
                if obj is None:
                    out.skip(reason, lineno, detail)
                else:
                    out.add(obj.get(out.key, _MISSING), lineno)
            if lineno % _REPORT_EVERY == 0:
                report()
                if settings.max_docs and all(o.docs >= settings.max_docs
                                             for o in outputs.values()):
                    break  # the merge keeps only the first max_docs documents anyway
        for out in outputs.values():
            out.flush()
        for out in outputs.values():
            out.writer.finalize()
    except BaseException:
        for out in outputs.values():
            out.writer.abort()
        raise
    report()
    manifest = {
        "task_id": task_id,
        "settings_hash": settings.settings_hash,
        "task": task.describe(),
        "lines": lines,
        "utf8_boms": getattr(reader, "boms", 0),
        "elapsed_s": round(time.time() - started, 3),
        "verified_documents": getattr(tok, "verified", 0) - checks_before[0],
        "routed_documents": getattr(tok, "routed", 0) - checks_before[1],
        "keys": {key: {"documents": o.docs, "tokens": o.tokens, "skipped": dict(o.skipped),
                       "examples": o.examples} for key, o in outputs.items()},
    }
    atomic_write_json(manifest_path(settings.shard_dir, task_id), manifest)
    return manifest
