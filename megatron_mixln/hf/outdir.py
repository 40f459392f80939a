"""Output directories that appear whole or not at all: staged under a temporary sibling, renamed at the end."""
from __future__ import annotations

import contextlib
import os
import shutil


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
    tmp = f"{path}.tmp-{os.getpid()}"
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
