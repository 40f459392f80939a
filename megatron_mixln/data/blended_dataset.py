"""Blend several datasets by weight, with Megatron's greedy "most behind its weight" rule.

Sample s goes to the dataset j maximizing ``w_j * max(s, 1) - count_j`` (first one on ties), the
same arithmetic as megatron-core's C++ ``build_blending_indices``; so for every prefix of the
blend each dataset's count stays within about one sample of ``w_j * s``.
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


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index int16[size], sample index within that dataset int64[size]).

    A plain Python loop (about a microsecond per sample; the result is cached on disk).
    """
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    which, nth = array("h"), array("q")
    others = range(1, len(w))
    for s in range(size):
        scale = float(max(s, 1))
        best, best_error = 0, w[0] * scale - counts[0]
        for j in others:
            error = w[j] * scale - counts[j]
            if error > best_error:
                best, best_error = j, error
        which.append(best)
        nth.append(counts[best])
        counts[best] += 1
    return (np.frombuffer(which, np.int16).copy() if size else np.zeros(0, np.int16),
            np.frombuffer(nth, np.int64).copy() if size else np.zeros(0, np.int64))


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float],
                 size: int, cache_dir: str | None = None, description: dict | None = None) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise DataError("BlendedDataset needs one weight per dataset")
        if len(datasets) >= 32767:
            raise DataError("at most 32766 datasets can be blended (int16 index)")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        full = {"class": "BlendedDataset", "version": 1, "weights": self.weights,
                "size": self.size, "datasets": description or {}}
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
        which, nth = build_blending_indices(self.weights, self.size)
        return {"dataset_index": which, "dataset_sample_index": nth}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -self.size <= i < self.size:
            raise IndexError(f"sample {i} out of range ({self.size} samples)")
        i %= self.size
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
