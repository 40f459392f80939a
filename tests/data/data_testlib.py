"""Helpers shared by the data tests (a uniquely named module: tests dirs share sys.path)."""

from __future__ import annotations

import gzip
import json
import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PYTHON = sys.executable


def read_jsonl_texts(paths, key: str = "text") -> list[str]:
    """The ``key`` fields of JSON-lines files, in order (an independent reader for references)."""
    texts = []
    for path in paths:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            texts += [json.loads(line)[key] for line in fh if line.strip()]
    return texts


def write_lines(path, lines) -> str:
    """Write raw lines (bytes or str, newline added) to ``path``, gzipped if it ends in .gz."""
    data = b"".join((l if isinstance(l, bytes) else l.encode("utf-8")) + b"\n" for l in lines)
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as fh:
        fh.write(data)
    return str(path)


def file_bytes(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def tool_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env
