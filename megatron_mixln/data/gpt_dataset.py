"""GPT pretraining samples over one split of an indexed dataset, with Megatron's exact semantics.

Three index arrays, all built from one seeded ``np.random.RandomState`` exactly as megatron-core
builds them (so a seed gives the same samples here and there):

  * document index: the split's documents tiled once per epoch and shuffled (the last epoch
    shuffled separately when it is used for less than 80 %);
  * sample index: (position in the document index, token offset) where sample k starts. Samples
    are ``seq_length + 1`` tokens, may span documents, and consecutive samples share one token
    (the last target of one is the first input of the next), so one epoch of T tokens gives
    ``(T - 1) // seq_length`` samples;
  * shuffle index: a permutation of the samples.

As in Megatron, a "document" here is a sequence of the indexed dataset (they are the same for
files written without sentence splitting).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import xxhash

from .errors import DataError
from .index_cache import cached_arrays
from .indexed_dataset import IndexedDataset

_CHUNK = 1 << 20  # document positions per vectorized step of the sample-index build
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
MANY_EPOCHS = 100  # more epochs than this of one split: almost surely a mistaken sample count
_DOC_AND_LENGTH = np.dtype([("document", np.int32), ("length", np.int32)])


def num_epochs_for(num_samples: int | None, tokens_per_epoch: int, seq_length: int) -> int:
    """Fewest epochs that hold ``num_samples`` samples of ``seq_length + 1`` tokens."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """int32 ``[num_epochs * len(documents)]``: ``documents`` tiled per epoch and shuffled, as
    megatron-core's ``gpt_dataset._build_document_index`` (same draws from ``rng``)."""
    index = np.tile(np.asarray(documents, np.int32), num_epochs)
    _shuffle_epochs(index, len(documents), num_epochs, rng, separate_final_epoch)
    return index


def _shuffle_epochs(index: np.ndarray, per_epoch: int, num_epochs: int,
                    rng: np.random.RandomState, separate_final_epoch: bool) -> None:
    """Shuffle ``index`` in place as megatron-core shuffles its document index: all epochs as one,
    or the first ``num_epochs - 1`` and then the last. ``RandomState.shuffle`` draws the same swaps
    whatever the item size, so a record array of (document, length) is permuted exactly as the
    int32 document index alone would be."""
    if not separate_final_epoch or num_epochs == 1:
        rng.shuffle(index)
        return
    rng.shuffle(index[:(num_epochs - 1) * per_epoch])
    rng.shuffle(index[(num_epochs - 1) * per_epoch:])


def sample_index_dtype(document_positions: int, sequence_lengths: np.ndarray) -> np.dtype:
    """megatron-core's choice (``datasets/helpers.py:build_sample_idx``): int32 when both the
    document-index length and the longest sequence of the whole dataset fit in int32, else int64."""
    largest = max(document_positions, int(sequence_lengths.max()))
    return np.dtype(np.int32 if largest <= np.iinfo(np.int32).max else np.int64)


def build_sample_index(lengths_in_order: np.ndarray, seq_length: int, num_samples: int,
                       dtype: np.dtype = np.dtype(np.int64)) -> np.ndarray:
    """``(num_samples + 1, 2)`` array of (document position, offset) where sample k starts.

    ``lengths_in_order[p]`` is the length of the document at position p of the document index.
    Sample k starts at token ``k * seq_length`` of the documents' concatenation (consecutive
    samples of ``seq_length + 1`` tokens share one), as megatron-core's C++
    ``helpers.cpp:build_sample_idx`` walks it. Here the last sample starting in each document,
    ``(end - 1) // seq_length``, gives each document's count of sample starts, which is repeated
    out, in chunks of documents: linear in documents + samples, streaming memory access only.
    """
    out = np.empty((num_samples + 1, 2), dtype)
    k, first_token = 0, 0
    for c0 in range(0, len(lengths_in_order), _CHUNK):
        lengths = lengths_in_order[c0:c0 + _CHUNK].astype(np.int64)
        ends = np.cumsum(lengths)
        ends += first_token
        last_k = (ends - 1) // seq_length  # the last sample starting at or before each end
        counts = np.diff(last_k, prepend=k - 1)
        n = min(int(last_k[-1]) + 1, num_samples + 1) - k
        if n > 0:
            block = out[k:k + n]
            block[:, 0] = np.repeat(np.arange(c0, c0 + len(lengths), dtype=dtype), counts)[:n]
            starts = ends - lengths  # of each document, relative to sample k's start
            starts -= k * seq_length
            offsets = np.repeat(starts, counts)[:n]
            np.subtract(np.arange(0, n * seq_length, seq_length, dtype=np.int64), offsets, out=offsets)
            block[:, 1] = offsets
            k += n
        first_token = int(ends[-1])
        if k > num_samples:
            break
    assert k == num_samples + 1, (k, num_samples)
    return out


def build_shuffle_index(num_samples: int, total_size: int,
                        rng: np.random.RandomState) -> np.ndarray:
    """Permutation of ``[0, total_size)``: ``[0, num_samples)`` and the rest shuffled separately,
    uint32 unless ``total_size`` needs int64 (megatron-core's ``_build_shuffle_index``)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    index = np.arange(total_size, dtype=dtype)
    rng.shuffle(index[:num_samples])
    if num_samples < total_size:
        rng.shuffle(index[num_samples:])
    return index


def build_gpt_indices(sequence_lengths: np.ndarray, document_range: tuple[int, int], seq_length: int,
                      seed: int, num_samples: int | None) -> dict[str, np.ndarray]:
    """The three index arrays of documents ``[begin, end)``, equal (values and dtypes) to those of
    megatron-core's ``GPTDataset`` with ``random_seed=seed``.

    Peak memory is the three outputs plus one 8-byte record per document position: documents and
    their lengths are shuffled together, so the sample index reads lengths in order instead of
    gathering them at random from ``sequence_lengths``.
    """
    begin, end = document_range
    per_epoch_docs = end - begin
    tokens_per_epoch = int(np.sum(sequence_lengths[begin:end], dtype=np.int64))
    num_epochs = num_epochs_for(num_samples, tokens_per_epoch, seq_length)
    per_epoch = (tokens_per_epoch - 1) // seq_length
    separate_final_epoch = False
    if num_epochs > 1:
        sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        from_final = num_samples - sans_final
        separate_final_epoch = from_final < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed)
    records = np.empty(num_epochs * per_epoch_docs, _DOC_AND_LENGTH)
    for c0 in range(0, per_epoch_docs, _CHUNK):  # epoch 0 in chunks (no full-size temporaries)
        c1 = min(c0 + _CHUNK, per_epoch_docs)
        records["document"][c0:c1] = np.arange(begin + c0, begin + c1, dtype=np.int32)
        records["length"][c0:c1] = sequence_lengths[begin + c0:begin + c1]
    for e in range(1, num_epochs):
        records[e * per_epoch_docs:(e + 1) * per_epoch_docs] = records[:per_epoch_docs]
    _shuffle_epochs(records, per_epoch_docs, num_epochs, rng, separate_final_epoch)
    total = (num_epochs * tokens_per_epoch - 1) // seq_length
    dtype = sample_index_dtype(len(records), sequence_lengths)
    sample_index = build_sample_index(records["length"], seq_length, total, dtype)
    document_index = np.ascontiguousarray(records["document"])
    del records
    first = sans_final if separate_final_epoch else total
    shuffle_index = build_shuffle_index(first, total, rng)
    return {"document_index": document_index, "sample_index": sample_index,
            "shuffle_index": shuffle_index}


def _warn_if_many_epochs(prefix: str, split_name: str, num_samples: int | None, tokens: int, documents: int,
                         seq_length: int) -> None:
    """UserWarning when ``num_samples`` needs more than MANY_EPOCHS passes over the split's
    ``tokens``, with the index size that implies (int32 document index per epoch, two int32 per
    sample in the sample index, one uint32 per sample in the shuffle index)."""
    epochs = num_epochs_for(num_samples, tokens, seq_length)
    if epochs <= MANY_EPOCHS:
        return
    index_mb = (4 * epochs * documents + 12 * ((epochs * tokens - 1) // seq_length)) / 1e6
    warnings.warn(f"{prefix}: {num_samples:,} {split_name} samples of {seq_length + 1} tokens need {epochs:,} "
                  f"epochs of the split's {tokens:,} tokens (more than {MANY_EPOCHS}); its sample index will "
                  f"take ~{index_mb:,.0f} MB. Ask for fewer samples or use more data.", UserWarning, stacklevel=3)


class GPTDataset(torch.utils.data.Dataset):
    """Samples ``{"tokens": int64[seq_length + 1]}`` from documents ``[begin, end)`` of a dataset.

    ``num_samples=None`` builds exactly one epoch. ``len()`` is the number of samples built,
    which is at least ``num_samples`` (whole epochs are built, as in Megatron).
    """

    def __init__(self, indexed: IndexedDataset, document_range: tuple[int, int], seq_length: int,
                 seed: int, num_samples: int | None, cache_dir: str | None = None,
                 split_name: str = "train") -> None:
        begin, end = document_range
        if seq_length < 1:
            raise DataError(f"seq_length must be >= 1, got {seq_length}")
        if not 0 <= begin < end <= len(indexed):
            raise DataError(f"{indexed.path_prefix}: {split_name} split [{begin}, {end}) is empty "
                            f"or outside its {len(indexed)} documents")
        self.indexed = indexed
        self.seq_length, self.seed, self.split_name = seq_length, seed, split_name
        tokens = int(indexed.sequence_lengths[begin:end].sum(dtype=np.int64))
        if tokens <= seq_length:
            raise DataError(f"{indexed.path_prefix}: the {split_name} split (documents "
                            f"[{begin}, {end})) has {tokens} tokens, fewer than one sample of "
                            f"seq_length + 1 = {seq_length + 1}")
        _warn_if_many_epochs(indexed.path_prefix, split_name, num_samples, tokens, end - begin, seq_length)
        idx = indexed.path_prefix + ".idx"
        description = {
            "class": "GPTDataset", "version": 3, "prefix": os.path.abspath(indexed.path_prefix),
            "idx_bytes": os.path.getsize(idx), "sequences": len(indexed), "tokens": tokens,
            # The indices depend on these lengths alone: a re-made dataset with the same counts
            # and sizes (e.g. the same documents in another order) must not reuse a stale cache.
            # xxh3-128, not sha1: at C4 scale (1.5 GB of lengths) sha1 alone took 1.5 s of every reload.
            "lengths_xxh3_128": xxhash.xxh3_128_hexdigest(np.ascontiguousarray(indexed.sequence_lengths[begin:end])),
            "split": split_name, "range": [begin, end], "seq_length": seq_length, "seed": seed,
            "num_samples": num_samples,
        }
        arrays = cached_arrays(
            cache_dir, f"GPTDataset-{split_name}", description,
            ["document_index", "sample_index", "shuffle_index"],
            lambda: build_gpt_indices(indexed.sequence_lengths, (begin, end), seq_length, seed,
                                      num_samples))
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self.num_samples = num_samples
        self.tokens_per_epoch = tokens

    def __len__(self) -> int:
        return len(self.sample_index) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens_at(i)}

    def tokens_at(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        k = int(self.shuffle_index[i % len(self)])
        (doc_begin, off_begin), (doc_end, off_end) = self.sample_index[k], self.sample_index[k + 1]
        doc_begin, off_begin, doc_end, off_end = map(int, (doc_begin, off_begin, doc_end, off_end))
        get = self.indexed.get
        if doc_begin == doc_end:
            parts = [get(int(self.document_index[doc_begin]), off_begin, off_end - off_begin + 1)]
        else:
            parts = [get(int(self.document_index[doc_begin]), off_begin)]
            parts += [get(int(self.document_index[d])) for d in range(doc_begin + 1, doc_end)]
            parts.append(get(int(self.document_index[doc_end]), 0, off_end + 1))
        return np.concatenate(parts).astype(np.int64)
