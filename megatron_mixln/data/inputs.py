"""Corpus inputs for the preprocessor: finding the files, cutting them into tasks, reading lines.

A task is one gzip file (gzip cannot be entered mid-stream) or one byte range of a plain JSON-lines
file. A byte-range task owns exactly the lines that *start* inside its range, so consecutive
ranges cover every line once whatever the cut points; this is what lets a single large file be
tokenized by several workers and still give the same bytes as one worker.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from typing import Iterator

from .errors import DataError

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_GLOB_CHARS = set("*?[")


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by ``patterns`` (paths, globs or directories), in order, each listed once.

    Globs and directories expand in sorted order so the output does not depend on the filesystem.
    """
    files: list[str] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataError(f"--input {pattern!r}: the pattern matches no files")
        elif os.path.isdir(pattern):
            matches = sorted(os.path.join(pattern, n) for n in os.listdir(pattern)
                             if n.endswith(JSON_SUFFIXES))
            if not matches:
                raise DataError(f"--input {pattern!r}: directory holds no {'/'.join(JSON_SUFFIXES)}"
                                f" files")
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            raise DataError(f"--input {pattern!r}: no such file")
        for path in matches:
            path = os.path.abspath(path)
            if not path.endswith(JSON_SUFFIXES):
                raise DataError(f"{path}: expected JSON lines ({', '.join(JSON_SUFFIXES)})")
            if not os.access(path, os.R_OK) or not os.path.isfile(path):
                raise DataError(f"{path}: not a readable file")
            if path not in files:
                files.append(path)
    return files


def check_json_lines(path: str) -> None:
    """Cheap sniff so that a JSON array or a binary file fails up front, not as N bad lines."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(64).lstrip()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot be read ({err})") from None
    if head.startswith(b"["):
        raise DataError(f"{path}: looks like one JSON array; expected JSON lines (one object per "
                        f"line, as C4's files)")
    if head and not head.startswith(b"{"):
        raise DataError(f"{path}: does not start with a JSON object; expected JSON lines")


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


def plan_file_tasks(files: list[str], chunk_bytes: int) -> list[Task]:
    """One task per gzip file; plain files above ``chunk_bytes`` are cut into byte ranges."""
    tasks: list[Task] = []
    for path in files:
        stat = os.stat(path)
        if path.endswith(".gz") or stat.st_size <= chunk_bytes:
            ranges = [(0, None)]
        else:
            cuts = list(range(0, stat.st_size, chunk_bytes))
            ranges = [(s, e) for s, e in zip(cuts, cuts[1:] + [None])]
        for start, end in ranges:
            tasks.append(Task(len(tasks), path, stat.st_size, stat.st_mtime_ns, start, end))
    return tasks


class LineReader:
    """Iterate ``(line number within the task, raw line bytes)``; ``position`` is the number of
    input bytes (compressed for gzip) consumed so far, for progress reporting."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.position = task.start
        self.first_line_offset = task.start  # byte offset of the first line this task owns

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        with open(self.task.path, "rb", buffering=1 << 20) as raw:
            if self.task.path.endswith(".gz"):
                yield from self._gzip_lines(raw)
            else:
                yield from self._range_lines(raw)

    def _gzip_lines(self, raw) -> Iterator[tuple[int, bytes]]:
        with io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), 1 << 20) as fh:
            try:
                for lineno, line in enumerate(fh, 1):
                    self.position = raw.tell()
                    yield lineno, line
            except (OSError, EOFError) as err:  # truncated or corrupt gzip stream
                raise DataError(f"{self.task.path}: corrupt or truncated gzip data ({err})") from None
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
            pos += len(line)
            lineno += 1
            self.position = pos
            yield lineno, line


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
