"""PretrainingSampler: rank slices of global batches, exact resume at any data-parallel size."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megatron_mixln.data import GPTDataset, IndexedDataset, PretrainingSampler


def global_stream(total, consumed, micro, dp, steps=None) -> list[int]:
    """Samples in global order as seen by all ranks together, rank 0 first in each step."""
    ranks = [iter(PretrainingSampler(total, consumed, micro, r, dp)) for r in range(dp)]
    out = []
    for step in itertools.count():
        if steps is not None and step == steps:
            break
        batches = [next(it, None) for it in ranks]
        if batches[0] is None:
            assert all(b is None for b in batches)
            break
        assert all(len(b) == micro for b in batches)
        out += [i for b in batches for i in b]
    return out


def test_each_rank_gets_its_slice_of_every_global_batch():
    assert list(PretrainingSampler(20, 0, 2, 1, 3)) == [[2, 3], [8, 9], [14, 15]]
    assert len(PretrainingSampler(20, 0, 2, 1, 3)) == 3
    # Every sample of the full global batches once, in order.
    assert global_stream(1000, 0, 4, 3) == list(range(1000 // 12 * 12))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4), (4, 3)])
def test_resume_at_consumed_samples_with_another_data_parallel_size(before, after):
    total, micro = 997, 3
    uninterrupted = global_stream(total, 0, micro, 1)
    first = global_stream(total, 0, micro, before, steps=7)
    consumed = len(first)
    second = global_stream(total, consumed, micro, after)
    assert first + second == uninterrupted[:len(first) + len(second)]
    assert len(uninterrupted) - len(first + second) < micro * after


def test_resumed_samples_equal_the_uninterrupted_ones(train_prefix):
    ds = GPTDataset(IndexedDataset(train_prefix), (0, 500), 32, 3, 400)
    full = [ds[i]["tokens"] for b in PretrainingSampler(len(ds), 0, 4, 0, 1) for i in b]
    first = [ds[i]["tokens"] for r in range(2) for b in
             itertools.islice(PretrainingSampler(len(ds), 0, 2, r, 2), 5) for i in b]
    # Ranks 0 and 1 of 5 steps (grouped per rank here), then one rank from 20 consumed samples.
    rest = [ds[i]["tokens"] for b in PretrainingSampler(len(ds), 20, 4, 0, 1) for i in b]
    first_sorted = sorted(first, key=lambda t: t.tobytes())
    assert [t.tobytes() for t in first_sorted] == sorted(t.tobytes() for t in full[:20])
    assert all(np.array_equal(a, b) for a, b in zip(rest, full[20:]))
    assert len(rest) == len(full) - 20


def test_drop_last_false_yields_the_tail():
    batches = list(PretrainingSampler(10, 0, 3, 1, 2, drop_last=False))
    assert batches == [[3, 4, 5], [9]]
    assert list(PretrainingSampler(10, 0, 3, 0, 2, drop_last=False)) == [[0, 1, 2], [6, 7, 8]]
    assert len(PretrainingSampler(10, 0, 3, 1, 2, drop_last=False)) == 2


@pytest.mark.parametrize("args", [(0, 0, 1, 0, 1), (10, 11, 1, 0, 1), (10, 0, 0, 0, 1),
                                  (10, 0, 1, 2, 2), (10, 0, 1, -1, 2)])
def test_invalid_arguments(args):
    with pytest.raises(ValueError):
        PretrainingSampler(*args)
