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
from itertools import chain
from typing import Any, Callable

import numpy as np

from .errors import BadInputError, TokenizerError
from megatron_mixln.fileio import atomic_write_json
from .hf_input import HFRecordReader
from .indexed_writer import IndexedDatasetWriter
from .inputs import PARQUET_SUFFIX, LineReader, ParquetReader, Task, count_newlines
from .tokenizer import Tokenizer, build_tokenizer

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


def shard_prefix(shard_dir: str, task_id: str, key: str) -> str:
    return os.path.join(shard_dir, f"{task_id}_{key}")


def manifest_path(shard_dir: str, task_id: str) -> str:
    return os.path.join(shard_dir, f"{task_id}.done")


_STATE: dict[str, Any] = {}


def init_worker(tokenizer_spec: str, progress: Callable[[tuple], None] | None) -> None:
    """Per-process setup: load the tokenizer once; ``progress`` receives (bytes, docs, tokens)."""
    _STATE["tokenizer"] = build_tokenizer(tokenizer_spec)
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
        obj = json.loads(text, strict=False)
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

    def _encode(self) -> list[list[int] | None]:
        try:
            return self.tok.encode_batch(self.texts)
        except Exception:  # noqa: BLE001 -- find the culprit(s) one by one, below
            pass
        out: list[list[int] | None] = []
        for text, lineno in zip(self.texts, self.linenos):
            try:
                out.append(self.tok.encode_batch([text])[0])
            except Exception as err:  # noqa: BLE001 -- e.g. lone surrogates from "\udc80" escapes
                self.skip("unencodable_text", lineno, f"{type(err).__name__}: {err}")
                out.append(None)
        return out

    def flush(self) -> None:
        if not self.texts:
            return
        encoded = self._encode()
        ids, linenos = [], []
        for doc, lineno in zip(encoded, self.linenos):
            if doc is None:
                continue
            if not doc:
                self.skip("no_tokens", lineno, "the text encodes to zero tokens")
                continue
            ids.append(doc)
            linenos.append(lineno)
        self.texts, self.linenos, self.chars = [], [], 0
        if not ids:
            return
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(chain.from_iterable(ids), np.int64, int(lengths.sum()))
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


def process_task(task: Task, settings: ShardSettings) -> dict:
    """Tokenize ``task`` into its shard files and return (and write) its manifest."""
    started = time.time()
    tok: Tokenizer = _STATE["tokenizer"]
    progress = _STATE.get("progress")
    task_id = task.identity(settings.settings_hash)
    if task.hf is not None:
        reader = HFRecordReader(task)
    elif task.path.endswith(PARQUET_SUFFIX):
        reader = ParquetReader(task, settings.json_keys)
    else:
        reader = LineReader(task)
    where = _Location(task, reader)
    outputs = {key: _KeyOutput(key, IndexedDatasetWriter(
        shard_prefix(settings.shard_dir, task_id, key), settings.dtype), settings, tok, where)
        for key in settings.json_keys}
    lines, reported = 0, [task.start, 0, 0]

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
        "keys": {key: {"documents": o.docs, "tokens": o.tokens, "skipped": dict(o.skipped),
                       "examples": o.examples} for key, o in outputs.items()},
    }
    atomic_write_json(manifest_path(settings.shard_dir, task_id), manifest)
    return manifest
