"""Megatron's memory-mapped indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``), read and written.

The format (see STACK.md §1) is byte-compatible with Megatron-LM, Megatron-DeepSpeed, GPT-NeoX
and ``megatron-core``::

    .idx: b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 N sequences | u64 D doc bounds
          | int32[N] lengths | int64[N] byte offsets into .bin | int64[D] document boundaries
    .bin: the sequences' tokens, concatenated, in that dtype

Our own additions are the checks: a truncated, foreign or mismatched pair is reported with the
file name and what disagrees, instead of the numpy error (or silent garbage) it would give later.
Writers keep memory flat: tokens go straight to the .bin, lengths are spilled to a side file, and
the .idx is streamed in chunks. Everything is written under a temporary name and renamed when done.
"""

from __future__ import annotations

import os
import struct
from array import array
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import IndexedDatasetError
from .fileio import commit, temp_path

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_CHUNK = 1 << 20  # elements per streamed chunk of an index array


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Megatron's rule: uint16 when every id fits comfortably below 65500, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def check_fits(values: np.ndarray, dtype: np.dtype, where: str) -> None:
    """Raise unless every value of the integer array ``values`` is representable in ``dtype``."""
    if values.size == 0 or values.dtype == dtype:
        return
    info = np.iinfo(dtype)
    lo, hi = int(values.min()), int(values.max())
    if lo < info.min or hi > info.max:
        bad = lo if lo < info.min else hi
        raise IndexedDatasetError(
            f"{where}: token id {bad} does not fit the dataset dtype {np.dtype(dtype).name} "
            f"(range {info.min}..{info.max}); the tokenizer's ids exceed its declared vocabulary")


def _chunks(arr: np.ndarray, size: int = _CHUNK) -> Iterator[np.ndarray]:
    for start in range(0, len(arr), size):
        yield arr[start:start + size]


class IndexedDataset:
    """Read-only, memory-mapped view of ``<prefix>.bin``/``.idx``.

    ``full_check=True`` also verifies every length, pointer and boundary (O(N), chunked); the
    default checks are O(1) and still catch truncation, foreign files and mismatched pairs.
    """

    def __init__(self, path_prefix: str, full_check: bool = False) -> None:
        self.path_prefix = str(path_prefix)
        self._full_check = full_check
        self._open()

    # -- opening and validation -------------------------------------------------------------
    def _open(self) -> None:
        ipath, bpath = idx_path(self.path_prefix), bin_path(self.path_prefix)
        for path in (ipath, bpath):
            if not os.path.isfile(path):
                raise IndexedDatasetError(
                    f"{path}: not found; expected a Megatron indexed dataset "
                    f"{self.path_prefix}.bin + {self.path_prefix}.idx "
                    f"(pass the prefix without the extension)")
        idx_size, bin_size = os.path.getsize(ipath), os.path.getsize(bpath)
        with open(ipath, "rb") as fh:
            header = fh.read(HEADER_SIZE)
        if len(header) >= len(MAGIC) and header[:len(MAGIC)] != MAGIC:
            raise IndexedDatasetError(
                f"{ipath}: wrong magic {header[:9]!r}, expected {MAGIC!r}; "
                f"not a Megatron MMIDIDX index file")
        if len(header) < HEADER_SIZE:
            raise IndexedDatasetError(
                f"{ipath}: {idx_size} bytes, shorter than the {HEADER_SIZE}-byte header; truncated")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise IndexedDatasetError(f"{ipath}: index version {version}, only version 1 is known")
        code = header[17]
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"{ipath}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n_seq, n_doc = struct.unpack("<QQ", header[18:34])
        expected = HEADER_SIZE + 12 * n_seq + 8 * n_doc
        # Megatron's multimodal variant appends one int8 mode per sequence; the tokens are the same.
        if idx_size not in (expected, expected + n_seq):
            raise IndexedDatasetError(
                f"{ipath}: {idx_size} bytes, but its header declares {n_seq} sequences and "
                f"{n_doc} document boundaries, which take {expected} bytes; truncated or corrupt")
        if n_doc < 1:
            raise IndexedDatasetError(f"{ipath}: no document boundaries (need at least [0])")

        self._idx_mmap = np.memmap(ipath, mode="r", dtype=np.uint8)
        buf = self._idx_mmap
        self._lengths = np.frombuffer(buf, "<i4", n_seq, HEADER_SIZE)
        self._pointers = np.frombuffer(buf, "<i8", n_seq, HEADER_SIZE + 4 * n_seq)
        self._doc_idx = np.frombuffer(buf, "<i8", n_doc, HEADER_SIZE + 12 * n_seq)
        if self._doc_idx[0] != 0 or self._doc_idx[-1] != n_seq:
            raise IndexedDatasetError(
                f"{ipath}: document boundaries run {self._doc_idx[0]}..{self._doc_idx[-1]}, "
                f"expected 0..{n_seq} (the sequence count); corrupt index")
        itemsize = self.dtype.itemsize
        data_bytes = int(self._pointers[-1]) + int(self._lengths[-1]) * itemsize if n_seq else 0
        if n_seq and (self._pointers[0] != 0 or self._lengths[-1] < 0):
            raise IndexedDatasetError(f"{ipath}: first pointer/last length invalid; corrupt index")
        if data_bytes != bin_size:
            raise IndexedDatasetError(
                f"{bpath}: {bin_size} bytes, but {ipath} says its {n_seq} sequences of "
                f"{self.dtype.name} take {data_bytes} bytes; truncated .bin, or a .bin and .idx "
                f"from different runs")
        self._bin_mmap = (np.memmap(bpath, mode="r", dtype=np.uint8) if bin_size
                          else np.zeros(0, np.uint8))
        if self._full_check:
            self._check_all(ipath)

    def _check_all(self, ipath: str) -> None:
        """O(N) consistency check of lengths, pointers and document boundaries."""
        itemsize = self.dtype.itemsize
        expected_ptr = 0
        for start in range(0, len(self._lengths), _CHUNK):
            lengths = self._lengths[start:start + _CHUNK].astype(np.int64)
            if (lengths < 0).any():
                raise IndexedDatasetError(f"{ipath}: negative sequence length near #{start}")
            ends = np.cumsum(lengths * itemsize) + expected_ptr
            starts = ends - lengths * itemsize
            if not np.array_equal(starts, self._pointers[start:start + _CHUNK]):
                bad = start + int(np.argmax(starts != self._pointers[start:start + _CHUNK]))
                raise IndexedDatasetError(
                    f"{ipath}: pointer of sequence {bad} disagrees with the lengths before it")
            expected_ptr = int(ends[-1])
        for start in range(0, len(self._doc_idx), _CHUNK):
            part = self._doc_idx[max(start - 1, 0):start + _CHUNK]
            if (np.diff(part) < 0).any():
                raise IndexedDatasetError(f"{ipath}: document boundaries decrease near #{start}")

    # -- pickling (DataLoader workers): reopen the maps instead of copying them ---------------
    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.path_prefix = state["path_prefix"]
        self._full_check = False
        self._open()

    # -- access ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of sequence ``i`` (to its end when length is None)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.path_prefix} ({n} sequences)")
        i %= n
        size = int(self._lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.path_prefix}: [{offset}, {offset + length}) is outside "
                             f"sequence {i} of length {size}")
        start = int(self._pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_mmap, self.dtype, length, start)

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        return self._doc_idx

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return self._bin_mmap.size // self.dtype.itemsize

    def close(self) -> None:
        for name in ("_lengths", "_pointers", "_doc_idx", "_idx_mmap", "_bin_mmap"):
            self.__dict__.pop(name, None)


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
        if len(self._buf) >= _CHUNK:
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
            part = np.fromfile(self._fh, self.dtype, _CHUNK)
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
        try:
            self._bin.close()
            n_seq, n_doc = self._lengths.count, self._doc_ends.count + 1

            def doc_chunks() -> Iterator[np.ndarray]:
                yield np.zeros(1, np.int64)
                yield from self._doc_ends.chunks()

            idx_tmp = temp_path(idx_path(self.path_prefix)) + ".full"
            write_index(idx_tmp, self.dtype, n_seq, n_doc, self._lengths.chunks, doc_chunks)
            commit(self._bin_tmp, bin_path(self.path_prefix))
            os.replace(idx_tmp, idx_path(self.path_prefix))
        except BaseException:
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
            yield from _chunks(src.sequence_lengths[:seqs])

    def doc_chunks() -> Iterator[np.ndarray]:
        yield np.zeros(1, np.int64)
        offset = 0
        for src, docs, seqs in takes:
            for part in _chunks(src.document_indices[1:docs + 1]):
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
        commit(bin_tmp, out_bin)
        os.replace(idx_tmp, idx_path(out_prefix))
    finally:
        for tmp in (bin_tmp, idx_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
    tokens = sum(int(src.sequence_lengths[:seqs].sum(dtype=np.int64)) for src, _, seqs in takes)
    return n_doc - 1, tokens
