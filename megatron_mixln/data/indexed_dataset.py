"""Megatron's memory-mapped indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``), read and written.

The format (see STACK.md §1) is byte-compatible with Megatron-LM, Megatron-DeepSpeed, GPT-NeoX
and ``megatron-core``::

    .idx: b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 N sequences | u64 D doc bounds
          | int32[N] lengths | int64[N] byte offsets into .bin | int64[D] document boundaries
    .bin: the sequences' tokens, concatenated, in that dtype

Our own addition is the checking: a truncated, foreign or mismatched pair is reported with the
file name and what disagrees, instead of the numpy error (or silent garbage) it would give later.
Writing and merging live in ``indexed_writer.py``.
"""

from __future__ import annotations

import os
import struct
from typing import Iterator

import numpy as np

from .errors import IndexedDatasetError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
CHUNK = 1 << 20  # elements per streamed chunk of an index array


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Megatron's rule: uint16 when every id fits comfortably below 65500, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def missing_prefix_hint(prefix: str) -> str:
    """For a prefix with no ``.bin``/``.idx`` pair: "; did you mean X?" naming the datasets that
    ``preprocess_c4.py --output-prefix PREFIX`` writes (``PREFIX_<key>_document``, key ``text`` first),
    or that the prefix was given with its extension; "" when there is nothing to suggest."""
    prefix = str(prefix)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext) and os.path.isfile(idx_path(prefix[:-len(ext)])):
            return f"; did you mean {prefix[:-len(ext)]}? (the prefix, without {ext})"
    directory, stem = os.path.split(prefix)
    try:
        names = sorted(os.listdir(directory or "."))
    except OSError:
        return ""
    keys = [n[len(stem) + 1:-len("_document.idx")] for n in names
            if n.startswith(stem + "_") and n.endswith("_document.idx")
            and os.path.isfile(os.path.join(directory, n[:-len(".idx")] + ".bin"))]
    keys.sort(key=lambda k: (k != "text", k))
    if not keys:
        return ""
    return "; did you mean " + " or ".join(f"{prefix}_{k}_document" for k in keys) + "?"


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


def iter_chunks(arr: np.ndarray, size: int = CHUNK) -> Iterator[np.ndarray]:
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
                    f"(pass the prefix without the extension){missing_prefix_hint(self.path_prefix)}")
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
        for start in range(0, len(self._lengths), CHUNK):
            lengths = self._lengths[start:start + CHUNK].astype(np.int64)
            if (lengths < 0).any():
                raise IndexedDatasetError(f"{ipath}: negative sequence length near #{start}")
            ends = np.cumsum(lengths * itemsize) + expected_ptr
            starts = ends - lengths * itemsize
            if not np.array_equal(starts, self._pointers[start:start + CHUNK]):
                bad = start + int(np.argmax(starts != self._pointers[start:start + CHUNK]))
                raise IndexedDatasetError(
                    f"{ipath}: pointer of sequence {bad} disagrees with the lengths before it")
            expected_ptr = int(ends[-1])
        for start in range(0, len(self._doc_idx), CHUNK):
            part = self._doc_idx[max(start - 1, 0):start + CHUNK]
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
