"""Blend several datasets by weight, with Megatron's greedy "most behind its weight" rule.

Sample s goes to the dataset j maximizing ``w_j * max(s, 1) - count_j`` (first one on ties), the
same arithmetic as megatron-core's C++ ``build_blending_indices``; so for every prefix of the
blend each dataset's count stays within about one sample of ``w_j * s``. A blend of unspecified
size takes every sample of each dataset exactly once in the same order as megatron-core's
``build_exhaustive_blending_indices`` (a dataset leaves the race once it is spent).
"""

from __future__ import annotations

from array import array
from typing import Sequence

import numpy as np
import torch

from .errors import DataError
from .index_cache import cached_arrays


def normalize_weights(weights: Sequence[float]) -> list[float]:
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w <= 0).any() or not np.isfinite(w).all():
        raise DataError(f"blend weights {list(weights)} must be finite and > 0")
    return (w / w.sum()).tolist()


def _greedy_blend(weights: Sequence[float], size: int | None,
                  caps: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's "most behind its weight" loop; with ``caps``, dataset j stops at caps[j]."""
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    which, nth = array("h"), array("q")
    live = list(range(len(w)))
    total = sum(caps) if caps is not None else size
    for s in range(total):
        scale = float(max(s, 1))
        best, best_error = -1, float("-inf")
        for j in live:  # ascending order: the first of equal errors wins, as in the C++
            error = w[j] * scale - counts[j]
            if error > best_error:
                best, best_error = j, error
        which.append(best)
        nth.append(counts[best])
        counts[best] += 1
        if caps is not None and counts[best] == caps[best]:
            live.remove(best)
    return (np.frombuffer(which, np.int16).copy() if total else np.zeros(0, np.int16),
            np.frombuffer(nth, np.int64).copy() if total else np.zeros(0, np.int64))


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index int16[size], sample index within that dataset int64[size]).

    ``weights`` normalized to sum 1. A plain Python loop (about a microsecond per sample; the
    result is cached on disk). Matches megatron-core's ``helpers.build_blending_indices``.
    """
    return _greedy_blend(weights, size, None)


def build_exhaustive_blending_indices(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of dataset j (``sizes[j]`` of them) exactly once, ``sum(sizes)`` in all,
    interleaved in proportion to the sizes; matches megatron-core's
    ``helpers.build_exhaustive_blending_indices``. Raises DataError for a size below 1."""
    sizes = [int(x) for x in sizes]
    if any(x < 1 for x in sizes):
        raise DataError(f"blend: every dataset needs at least one sample, got sizes {sizes}")
    total = float(sum(sizes))
    return _greedy_blend([x / total for x in sizes], None, sizes)


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    ``size=None`` (megatron-core's exhaustive blend): ``weights`` are the datasets' sample counts
    and every sample of every dataset is used once.
    """

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float],
                 size: int | None, cache_dir: str | None = None,
                 description: dict | None = None) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise DataError("BlendedDataset needs one weight per dataset")
        if len(datasets) >= 32767:
            raise DataError("at most 32766 datasets can be blended (int16 index)")
        self.datasets = list(datasets)
        self.exhaustive_sizes = None if size is not None else [int(w) for w in weights]
        self.weights = normalize_weights(weights)
        self.size = int(size) if size is not None else sum(self.exhaustive_sizes)
        full = {"class": "BlendedDataset", "version": 1, "weights": self.weights,
                "size": self.size, "exhaustive": self.exhaustive_sizes,
                "datasets": description or {}}
        arrays = cached_arrays(cache_dir, "BlendedDataset", full,
                               ["dataset_index", "dataset_sample_index"], self._build)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        for j, dataset in enumerate(self.datasets):
            used = self.dataset_sample_index[self.dataset_index == j]
            if len(used) and int(used.max()) >= len(dataset):
                raise DataError(f"blend: dataset {j} has {len(dataset)} samples but the blend "
                                f"needs {int(used.max()) + 1}")

    def _build(self) -> dict[str, np.ndarray]:
        if self.exhaustive_sizes is not None:
            which, nth = build_exhaustive_blending_indices(self.exhaustive_sizes)
        else:
            which, nth = build_blending_indices(self.weights, self.size)
        return {"dataset_index": which, "dataset_sample_index": nth}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -self.size <= i < self.size:
            raise IndexError(f"sample {i} out of range ({self.size} samples)")
        i %= self.size
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
