"""Megatron's pretraining batch sampler: the micro-batches of one data-parallel rank.

The global order is simply sample ``consumed_samples``, ``consumed_samples + 1``, ...; each global
batch of ``micro_batch_size * data_parallel_size`` consecutive indices is cut into per-rank slices.
Because the order does not depend on the data-parallel size, a run can resume at an exact
``consumed_samples`` with a different number of ranks and see exactly the samples an
uninterrupted run would have seen next.
"""

from __future__ import annotations

from typing import Iterator


class PretrainingSampler:
    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be > 0, got {total_samples}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} outside [0, {total_samples}]"
                             f" (resuming past the end of the dataset?)")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError("micro_batch_size and data_parallel_size must be > 0")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} outside "
                             f"[0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        left = self.total_samples - self.consumed_samples
        full, tail = divmod(left, self.global_batch)
        start = self.data_parallel_rank * self.micro_batch_size
        return full + (1 if not self.drop_last and tail > start else 0)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        base = self.consumed_samples
        while base + self.global_batch <= self.total_samples:
            yield list(range(base + start, base + start + self.micro_batch_size))
            base += self.global_batch
        if not self.drop_last:  # last partial global batch: each rank its (possibly short) slice
            tail = list(range(base + start, min(base + start + self.micro_batch_size,
                                                self.total_samples)))
            if tail:
                yield tail
