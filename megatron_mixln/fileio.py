"""Crash-safe file writing: write to a temporary name, fsync, then rename.

A reader (or a rerun after a kill) therefore sees either the previous complete file or the new
complete file, never a half-written one. ``os.replace`` is atomic on POSIX within one filesystem,
which is why the temporary file always lives next to its destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import IO, Any, Iterator


def temp_path(path: str) -> str:
    """The temporary sibling of ``path``; the pid keeps concurrent writers apart."""
    return f"{path}.tmp-{os.getpid()}"


def fsync_dir(path: str) -> None:
    """Flush a directory entry (the rename itself) to disk."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str, path: str) -> None:
    """Fsync ``tmp`` and rename it to ``path``."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success only."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_with(path: str, write) -> None:
    """For writers that take a file name (e.g. safetensors' save_file): write(tmp), fsync, rename."""
    tmp = temp_path(path)
    try:
        write(tmp)
        commit(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# Output directories that appear whole or not at all (the converters' and exporters' --output).

def check_output(path: str, overwrite: bool, flag: str = "--output") -> None:
    """Refuse a non-empty output directory unless overwrite; refuse a file. Call before any work."""
    if os.path.isfile(path):
        raise ValueError(f"{flag} {path}: is a file, expected a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ValueError(f"{flag} {path}: exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_directory(path: str):
    """Yield a temporary sibling of `path` to write into; on success it replaces `path`, on error it is removed."""
    path = os.path.abspath(path)
    tmp = temp_path(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)
