"""One document per sample, truncated or right-padded: the Mix-LN reference code's loader (--sample-mode truncate-pad).

The reference tokenizes each C4 document to exactly 256 tokens (text past it is dropped, shorter
documents are padded) and masks the padding out of the loss. Here sample k is document
``document_index[k]`` of the split: its first ``seq_length + 1`` tokens, right-padded with
``pad_id``, plus ``num_tokens``, the count of real tokens (the rest is padding). The document order
is the split's documents tiled over as many epochs as needed and shuffled with a seeded
``np.random.RandomState`` (Megatron's document-index shuffle), so a seed fixes the order.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import DataError
from .gpt_dataset import build_document_index
from .indexed_dataset import IndexedDataset


class DocumentDataset(torch.utils.data.Dataset):
    """Items ``{"tokens": int64[seq_length + 1] (padded with pad_id), "num_tokens": int}``.

    ``num_samples=None`` is one epoch (each document once: evaluation); otherwise whole epochs are
    tiled until ``len() >= num_samples``. Raises DataError for an empty range.
    """

    def __init__(self, indexed: IndexedDataset, document_range: tuple[int, int], seq_length: int,
                 seed: int, num_samples: int | None, pad_id: int = 0, split_name: str = "train") -> None:
        begin, end = document_range
        if not 0 <= begin < end <= len(indexed):
            raise DataError(f"{indexed.path_prefix}: {split_name} split [{begin}, {end}) is empty "
                            f"or outside its {len(indexed)} documents")
        self.indexed, self.seq_length, self.pad_id = indexed, seq_length, pad_id
        documents = np.arange(begin, end, dtype=np.int32)
        epochs = 1 if num_samples is None else max(1, -(-num_samples // len(documents)))
        self.document_index = build_document_index(documents, epochs, np.random.RandomState(seed), False)

    def __len__(self) -> int:
        return len(self.document_index)

    def num_tokens(self, i: int) -> int:
        """Real tokens of sample i (<= seq_length + 1)."""
        doc = int(self.document_index[i])
        return min(int(self.indexed.sequence_lengths[doc]), self.seq_length + 1)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        n = self.num_tokens(i)
        tokens = np.full(self.seq_length + 1, self.pad_id, dtype=np.int64)
        if n:
            tokens[:n] = self.indexed.get(int(self.document_index[i]), 0, n)
        return {"tokens": tokens, "num_tokens": n}
