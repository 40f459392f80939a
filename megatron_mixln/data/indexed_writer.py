"""Writing Megatron indexed datasets (``<prefix>.bin``/``.idx``) and merging several into one.

Memory stays flat however much is written: tokens go straight to the .bin, per-sequence lengths
are spilled to a side file, and the .idx is streamed in chunks. Everything is written under a
temporary name, fsynced and renamed when complete, so a killed writer never leaves a file under
the final name.
"""

from __future__ import annotations

import os
import struct
from array import array
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import IndexedDatasetError
from megatron_mixln.fileio import commit, fsync_dir, temp_path
from .indexed_dataset import (CHUNK, CODE_OF_DTYPE, MAGIC, VERSION, IndexedDataset, bin_path,
                              check_fits, idx_path, iter_chunks)


class _SpilledInts:
    """An append-only integer array kept in a side file, so millions of lengths cost no RAM."""

    def __init__(self, path: str, dtype: str) -> None:
        self.path, self.dtype = path, np.dtype(dtype)
        self._fh = open(path, "w+b")
        self._buf = array("q")
        self.count = 0

    def extend(self, values: Iterable[int] | np.ndarray) -> None:
        if isinstance(values, np.ndarray):
            self._flush()
            values.astype(self.dtype).tofile(self._fh)
            self.count += len(values)
            return
        before = len(self._buf)
        self._buf.extend(values)
        self.count += len(self._buf) - before
        if len(self._buf) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            np.frombuffer(self._buf, np.int64).astype(self.dtype).tofile(self._fh)
            self._buf = array("q")

    def chunks(self) -> Iterator[np.ndarray]:
        self._flush()
        self._fh.flush()
        self._fh.seek(0)
        while True:
            part = np.fromfile(self._fh, self.dtype, CHUNK)
            if not len(part):
                return
            yield part

    def close(self) -> None:
        self._fh.close()
        if os.path.exists(self.path):
            os.remove(self.path)


def write_index(path: str, dtype: np.dtype, n_seq: int, n_doc: int,
                length_chunks: Callable[[], Iterable[np.ndarray]],
                doc_chunks: Callable[[], Iterable[np.ndarray]]) -> None:
    """Stream a .idx to ``path`` (temp, fsync, rename); the chunk callables are called anew per pass.

    The lengths are read twice (once for themselves, once to derive the byte pointers), which is
    why they come as a callable rather than an iterator.
    """
    itemsize = np.dtype(dtype).itemsize
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + struct.pack("<QB", VERSION, CODE_OF_DTYPE[np.dtype(dtype)]))
            fh.write(struct.pack("<QQ", n_seq, n_doc))
            written = 0
            for part in length_chunks():
                fh.write(np.asarray(part).astype("<i4").tobytes())
                written += len(part)
            assert written == n_seq, (written, n_seq)
            pos = 0
            for part in length_chunks():
                nbytes = np.asarray(part).astype(np.int64) * itemsize
                ends = np.cumsum(nbytes) + pos
                fh.write((ends - nbytes).astype("<i8").tobytes())
                pos = int(ends[-1]) if len(ends) else pos
            written = 0
            for part in doc_chunks():
                fh.write(np.asarray(part).astype("<i8").tobytes())
                written += len(part)
            assert written == n_doc, (written, n_doc)
        commit(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def install(bin_tmp: str, idx_tmp: str, path_prefix: str) -> None:
    """Move a finished ``.bin``/``.idx`` pair (temporary names, the .idx already fsynced) onto
    ``path_prefix``'s final names.

    Two renames cannot be atomic together, so the previous ``.idx`` is removed first: a kill between
    the steps leaves the final names without an ``.idx`` (a clean "not found" for readers, redone by
    a rerun), never a new ``.bin`` beside the old ``.idx`` (whose lengths could happen to fit it).
    """
    final_idx = idx_path(path_prefix)
    if os.path.exists(final_idx):
        os.remove(final_idx)
        fsync_dir(final_idx)
    commit(bin_tmp, bin_path(path_prefix))
    os.replace(idx_tmp, final_idx)
    fsync_dir(final_idx)


class IndexedDatasetWriter:
    """Append documents to ``<prefix>.bin``/``.idx``; nothing appears under the final names until
    ``finalize()`` (a killed writer leaves only ``*.tmp-<pid>`` files behind).

    Each document is one sequence, as Megatron's ``preprocess_data.py`` writes without
    ``--split-sentences``; ``add_document(tokens, sequence_lengths=[...])`` writes several.
    """

    def __init__(self, path_prefix: str, dtype: np.dtype | type = np.int32) -> None:
        self.path_prefix = str(path_prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise IndexedDatasetError(f"{path_prefix}: dtype {self.dtype} has no Megatron code")
        self._bin_tmp = temp_path(bin_path(self.path_prefix))
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = _SpilledInts(temp_path(self.path_prefix + ".lengths"), "<i4")
        self._doc_ends = _SpilledInts(temp_path(self.path_prefix + ".docs"), "<i8")
        self.num_tokens = 0
        self._finished = False

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    @property
    def num_sequences(self) -> int:
        return self._lengths.count

    @property
    def num_documents(self) -> int:
        return self._doc_ends.count

    def add_document(self, tokens: Sequence[int] | np.ndarray,
                     sequence_lengths: Sequence[int] | None = None) -> None:
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            check_fits(arr.astype(np.int64, copy=False), self.dtype, self.path_prefix)
        lengths = [len(arr)] if sequence_lengths is None else list(sequence_lengths)
        if sum(lengths) != len(arr):
            raise IndexedDatasetError(f"{self.path_prefix}: sequence lengths {lengths} do not "
                                      f"add up to the document's {len(arr)} tokens")
        arr.astype(self.dtype, copy=False).tofile(self._bin)
        self.num_tokens += len(arr)
        self._lengths.extend(lengths)
        self._doc_ends.extend([self._lengths.count])

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Fast path: many one-sequence documents, ``tokens`` already in this writer's dtype."""
        if tokens.dtype != self.dtype:
            raise IndexedDatasetError(f"{self.path_prefix}: got {tokens.dtype} tokens for a "
                                      f"{self.dtype} dataset")
        if int(lengths.sum()) != len(tokens):
            raise IndexedDatasetError(f"{self.path_prefix}: lengths do not add up to the tokens")
        tokens.tofile(self._bin)
        self.num_tokens += len(tokens)
        first = self._lengths.count + 1
        self._lengths.extend(lengths.astype(np.int32))
        self._doc_ends.extend(np.arange(first, first + len(lengths), dtype=np.int64))

    def finalize(self) -> None:
        """Write the .idx, then move both files to their final names."""
        if self._finished:
            return
        idx_tmp = temp_path(idx_path(self.path_prefix)) + ".full"
        try:
            self._bin.close()
            n_seq, n_doc = self._lengths.count, self._doc_ends.count + 1

            def doc_chunks() -> Iterator[np.ndarray]:
                yield np.zeros(1, np.int64)
                yield from self._doc_ends.chunks()

            write_index(idx_tmp, self.dtype, n_seq, n_doc, self._lengths.chunks, doc_chunks)
            install(self._bin_tmp, idx_tmp, self.path_prefix)
        except BaseException:
            if os.path.exists(idx_tmp):
                os.remove(idx_tmp)
            self.abort()
            raise
        self._cleanup()

    def abort(self) -> None:
        """Drop everything written so far; the final names are left untouched."""
        if not self._bin.closed:
            self._bin.close()
        if os.path.exists(self._bin_tmp):
            os.remove(self._bin_tmp)
        self._cleanup()

    def _cleanup(self) -> None:
        self._lengths.close()
        self._doc_ends.close()
        self._finished = True


def _copy_bytes(src: str, dst, nbytes: int) -> None:
    with open(src, "rb") as fh:
        left = nbytes
        while left > 0:
            block = fh.read(min(left, 16 << 20))
            if not block:
                raise IndexedDatasetError(f"{src}: ended {left} bytes early while merging")
            dst.write(block)
            left -= len(block)


def merge_indexed_datasets(prefixes: Sequence[str], out_prefix: str,
                           max_documents: int | None = None) -> tuple[int, int]:
    """Concatenate datasets (same dtype) into ``out_prefix``, in the given order.

    ``max_documents`` keeps only the first documents of the concatenation. Returns
    ``(documents, tokens)`` written. Memory stays flat: the .bin is copied in blocks and the index
    is streamed chunk by chunk from each source's memory map.
    """
    sources = [IndexedDataset(p) for p in prefixes]
    if not sources:
        raise IndexedDatasetError(f"{out_prefix}: nothing to merge")
    dtype = sources[0].dtype
    for src in sources:
        if src.dtype != dtype:
            raise IndexedDatasetError(f"{src.path_prefix}: dtype {src.dtype} differs from "
                                      f"{sources[0].path_prefix}'s {dtype}; cannot merge")
    # How much of each source to take (all of it, unless max_documents cuts inside it).
    takes: list[tuple[IndexedDataset, int, int]] = []  # (source, documents, sequences)
    left = max_documents if max_documents is not None else float("inf")
    for src in sources:
        docs = int(min(src.num_documents, left))
        takes.append((src, docs, int(src.document_indices[docs])))
        left -= docs
    n_seq = sum(t[2] for t in takes)
    n_doc = sum(t[1] for t in takes) + 1

    def length_chunks() -> Iterator[np.ndarray]:
        for src, _, seqs in takes:
            yield from iter_chunks(src.sequence_lengths[:seqs])

    def doc_chunks() -> Iterator[np.ndarray]:
        yield np.zeros(1, np.int64)
        offset = 0
        for src, docs, seqs in takes:
            for part in iter_chunks(src.document_indices[1:docs + 1]):
                yield part + offset
            offset += seqs

    out_bin = bin_path(out_prefix)
    bin_tmp = temp_path(out_bin)
    idx_tmp = temp_path(idx_path(out_prefix)) + ".full"
    try:
        with open(bin_tmp, "wb") as dst:
            for src, _, seqs in takes:
                nbytes = (int(src.sequence_pointers[seqs]) if seqs < len(src)
                          else os.path.getsize(bin_path(src.path_prefix)))
                _copy_bytes(bin_path(src.path_prefix), dst, nbytes)
        write_index(idx_tmp, dtype, n_seq, n_doc, length_chunks, doc_chunks)
        install(bin_tmp, idx_tmp, out_prefix)
    finally:
        for tmp in (bin_tmp, idx_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
    tokens = sum(int(src.sequence_lengths[:seqs].sum(dtype=np.int64)) for src, _, seqs in takes)
    return n_doc - 1, tokens
