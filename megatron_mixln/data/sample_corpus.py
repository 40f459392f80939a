"""A C4-format sample corpus made from text every installation has: Python docstrings.

No network is needed: the module, class and function docstrings of the standard library and the
installed site-packages are real English prose (plus some code and reST markup), a few to tens of
MB of it. Files are walked in sorted order, duplicates and tiny docstrings are dropped, and gzip is
written with a zero timestamp, so the corpus is byte-identical for a given environment.

Output mirrors C4's layout: ``c4-train.00000-of-0000N.json.gz`` and
``c4-validation.00000-of-0000M.json.gz``, one ``{"text", "timestamp", "url"}`` object per line.
"""

from __future__ import annotations

import ast
import datetime
import gzip
import hashlib
import json
import os
import sysconfig
import tokenize
import warnings
from dataclasses import dataclass
from typing import Iterator

from megatron_mixln.fileio import atomic_open

_SKIP_DIRS = {"__pycache__", "test", "tests", "testing", "idle_test", "site-packages",
              "dist-packages", ".git"}
_MAX_SOURCE_BYTES = 2 << 20  # generated tables, not prose
_EPOCH = datetime.datetime(2019, 4, 18, tzinfo=datetime.timezone.utc)  # C4's crawl month


@dataclass
class CorpusOptions:
    output_dir: str
    target_mb: float = 4.0
    train_shards: int = 4
    valid_shards: int = 1
    valid_percent: float = 2.0
    min_chars: int = 200


def source_roots() -> list[tuple[str, str]]:
    """(label, directory) of the stdlib and the site-packages, each once."""
    paths = sysconfig.get_paths()
    roots, seen = [], set()
    for label, key in (("stdlib", "stdlib"), ("site-packages", "purelib"),
                       ("site-packages", "platlib")):
        path = os.path.realpath(paths[key])
        if os.path.isdir(path) and path not in seen:
            seen.add(path)
            roots.append((label, path))
    return roots


def iter_source_files() -> Iterator[tuple[str, str, str]]:
    """(label, root, relative path) of every .py file, in a stable sorted order."""
    for label, root in source_roots():
        for directory, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    yield label, root, os.path.relpath(path, root)


def extract_docstrings(source: str) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) of the module and every class/function in it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old code, etc.
        tree = ast.parse(source)

    def walk(node, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield name, doc
                yield from walk(child, name + ".")

    doc = ast.get_docstring(tree)
    if doc:
        yield "", doc
    yield from walk(tree, "")


def iter_documents(min_chars: int) -> Iterator[dict]:
    """C4-style records, deduplicated, in a deterministic order."""
    seen: set[bytes] = set()
    for label, root, rel in iter_source_files():
        path = os.path.join(root, rel)
        try:
            if os.path.getsize(path) > _MAX_SOURCE_BYTES:
                continue
            with tokenize.open(path) as fh:  # honours coding cookies
                source = fh.read()
            docs = list(extract_docstrings(source))
        except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError, OSError):
            continue
        for qualname, text in docs:
            text = text.strip()
            if len(text) < min_chars:
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a "\udc80" escape: not text
                continue
            digest = hashlib.sha1(" ".join(text.split()).encode("utf-8")).digest()
            if digest in seen:
                continue
            seen.add(digest)
            seconds = int.from_bytes(digest[:4], "little") % (14 * 86400)
            stamp = (_EPOCH + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
            url = f"pydoc://{label}/{rel.replace(os.sep, '/')}" + (f"#{qualname}" if qualname else "")
            yield {"text": text, "timestamp": stamp, "url": url, "_digest": digest}


def _shard_names(split: str, count: int) -> list[str]:
    return [f"c4-{split}.{i:05d}-of-{count:05d}.json.gz" for i in range(count)]


def _write_shards(docs: list[dict], directory: str, split: str, count: int) -> list[str]:
    """Contiguous runs of ``docs`` with about equal text bytes per shard."""
    total = sum(len(d["text"]) for d in docs) or 1
    paths, names = [], _shard_names(split, count)
    bounds, running, shard = [0], 0, 1
    for i, doc in enumerate(docs):
        running += len(doc["text"])
        if shard < count and running >= total * shard / count:
            bounds.append(i + 1)
            shard += 1
    bounds += [len(docs)] * (count + 1 - len(bounds))
    for name, lo, hi in zip(names, bounds, bounds[1:]):
        path = os.path.join(directory, name)
        with atomic_open(path, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                for doc in docs[lo:hi]:
                    record = {k: doc[k] for k in ("text", "timestamp", "url")}
                    gz.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        paths.append(path)
    return paths


def make_sample_corpus(opts: CorpusOptions) -> dict:
    """Write the corpus; returns {"train": [paths], "validation": [paths], "documents", "mb"}."""
    if opts.target_mb <= 0 or opts.train_shards < 1 or opts.valid_shards < 0:
        raise ValueError("need --target-mb > 0, --train-shards >= 1, --valid-shards >= 0")
    os.makedirs(opts.output_dir, exist_ok=True)
    target = int(opts.target_mb * 2**20)
    train, valid, size = [], [], 0
    threshold = int(opts.valid_percent * 100)  # out of 10000
    for doc in iter_documents(opts.min_chars):
        is_valid = opts.valid_shards and (
            int.from_bytes(doc["_digest"][4:8], "little") % 10000 < threshold)
        (valid if is_valid else train).append(doc)
        size += len(doc["text"].encode("utf-8"))
        if size >= target:
            break
    return {
        "train": _write_shards(train, opts.output_dir, "train", opts.train_shards),
        "validation": (_write_shards(valid, opts.output_dir, "validation", opts.valid_shards)
                       if opts.valid_shards else []),
        "documents": {"train": len(train), "validation": len(valid)},
        "mb": round(size / 2**20, 3),
    }
