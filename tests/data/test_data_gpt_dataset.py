"""GPT samples: one epoch uses every token of the split once, indices equal megatron-core's,
seeds behave, and the on-disk index cache is built once (by rank 0 under torch.distributed)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatron_mixln.data import GPTDataset, IndexedDataset
from megatron_mixln.data import gpt_dataset as gpt_module
from megatron_mixln.data.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
SEQ = 64


@pytest.fixture(scope="module")
def indexed(train_prefix) -> IndexedDataset:
    return IndexedDataset(train_prefix)


def test_one_epoch_uses_every_token_of_the_split_once(indexed):
    begin, end = 100, 2100
    ds = GPTDataset(indexed, (begin, end), SEQ, seed=3, num_samples=None)
    split_tokens = np.concatenate([indexed[d] for d in range(begin, end)]).astype(np.int64)
    total = len(split_tokens)
    assert len(ds) == (total - 1) // SEQ
    # Each document of the split exactly once in the epoch's order.
    assert sorted(ds.document_index.tolist()) == list(range(begin, end))
    samples = [ds[i]["tokens"] for i in range(len(ds))]
    assert all(s.dtype == np.int64 and s.shape == (SEQ + 1,) for s in samples)
    # Undo the sample shuffle; consecutive samples share one token.
    by_position = [None] * len(ds)
    for i, k in enumerate(np.asarray(ds.shuffle_index)):
        by_position[k] = samples[i]
    stream = np.concatenate([by_position[0]] + [s[1:] for s in by_position[1:]])
    used = len(ds) * SEQ + 1
    assert len(stream) == used and 0 <= total - used < SEQ
    in_epoch_order = np.concatenate([indexed[d] for d in ds.document_index]).astype(np.int64)
    assert np.array_equal(stream, in_epoch_order[:used])
    # Token counts: the samples hold the split's tokens minus the short tail that is dropped.
    vocab = int(split_tokens.max()) + 1
    tail = in_epoch_order[used:]
    assert np.array_equal(np.bincount(stream, minlength=vocab) + np.bincount(tail, minlength=vocab),
                          np.bincount(split_tokens, minlength=vocab))


def test_seeds(indexed):
    a = GPTDataset(indexed, (0, 1000), SEQ, seed=1, num_samples=500)
    b = GPTDataset(indexed, (0, 1000), SEQ, seed=1, num_samples=500)
    c = GPTDataset(indexed, (0, 1000), SEQ, seed=2, num_samples=500)
    first = lambda ds: np.stack([ds[i]["tokens"] for i in range(50)])  # noqa: E731
    assert np.array_equal(first(a), first(b))
    assert not np.array_equal(first(a), first(c))


@pytest.mark.parametrize("epochs_wanted", [None, 0.5, 2.9, 3.05])
def test_indices_equal_megatron_core(indexed, epochs_wanted):
    """Document, sample and shuffle indices against megatron-core's own (C++) helpers,
    including the case where the final epoch is shuffled separately (3.05 epochs)."""
    from megatron.core.datasets import helpers
    from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index

    documents = np.arange(50, 1550, dtype=np.int32)
    lengths = indexed.sequence_lengths
    per_epoch_tokens = int(lengths[documents].sum())
    per_epoch = (per_epoch_tokens - 1) // SEQ
    n = None if epochs_wanted is None else int(epochs_wanted * per_epoch)
    ours = gpt_module.build_gpt_indices(lengths, documents, SEQ, 1234, n)

    epochs = 1 if n is None else -(-(n * SEQ + 1) // per_epoch_tokens)
    sans_final = ((epochs - 1) * per_epoch_tokens - 1) // SEQ
    separate = epochs > 1 and n - sans_final < int(0.8 * per_epoch)
    assert separate == (epochs_wanted == 3.05)
    rng = np.random.RandomState(1234)
    doc_index = _build_document_index(documents, epochs, rng, separate)
    sample_index = helpers.build_sample_idx(lengths, doc_index, SEQ, epochs, per_epoch_tokens,
                                            True, True)
    total = sample_index.shape[0] - 1
    shuffle_index = _build_shuffle_index(sans_final if separate else total, total, rng)
    assert np.array_equal(ours["document_index"], doc_index)
    assert np.array_equal(ours["sample_index"], sample_index)
    assert np.array_equal(ours["shuffle_index"], shuffle_index)
    assert n is None or total >= n


def test_sample_index_chunks_agree(indexed, monkeypatch):
    """The chunked sample-index build gives the same answer for any chunk size."""
    documents = np.arange(0, 1000, dtype=np.int32)
    whole = gpt_module.build_gpt_indices(indexed.sequence_lengths, documents, SEQ, 5, 3000)
    monkeypatch.setattr(gpt_module, "_CHUNK", 7)
    chunked = gpt_module.build_gpt_indices(indexed.sequence_lengths, documents, SEQ, 5, 3000)
    assert np.array_equal(whole["sample_index"], chunked["sample_index"])


def test_index_cache_is_reused(indexed, tmp_path, monkeypatch):
    first = GPTDataset(indexed, (0, 800), SEQ, 9, 400, cache_dir=str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 4 and not [f for f in files if ".tmp-" in f]

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(gpt_module, "build_gpt_indices", must_not_build)
    again = GPTDataset(indexed, (0, 800), SEQ, 9, 400, cache_dir=str(tmp_path))
    assert np.array_equal(first[17]["tokens"], again[17]["tokens"])
    with pytest.raises(AssertionError, match="rebuilt"):  # other settings -> other cache entry
        GPTDataset(indexed, (0, 800), SEQ, 10, 400, cache_dir=str(tmp_path))


def test_index_cache_is_not_reused_for_a_remade_dataset(tmp_path):
    """Same documents in another order: same file sizes, sequence and token counts."""
    from megatron_mixln.data import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=n) for n in rng.integers(1, 60, size=200)]

    def make(order) -> IndexedDataset:
        with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as writer:
            for i in order:
                writer.add_document(docs[i])
        return IndexedDataset(str(tmp_path / "d"))

    cache = str(tmp_path / "cache")
    GPTDataset(make(range(200)), (0, 200), 16, 1, 300, cache_dir=cache)
    remade = make(rng.permutation(200))
    cached = GPTDataset(remade, (0, 200), 16, 1, 300, cache_dir=cache)
    fresh = GPTDataset(remade, (0, 200), 16, 1, 300)
    assert all(np.array_equal(cached[i]["tokens"], fresh[i]["tokens"]) for i in range(len(fresh)))


def _rank_job(rank, world_size, tmpdir, prefix, cache_dir):
    calls = []
    original = gpt_module.build_gpt_indices

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    gpt_module.build_gpt_indices = counting
    ds = GPTDataset(IndexedDataset(prefix), (0, 600), SEQ, 11, 300, cache_dir=cache_dir)
    return {"built": len(calls), "tokens": torch.from_numpy(np.stack([ds[i]["tokens"] for i in range(30)]))}


@pytest.mark.slow
def test_rank0_builds_and_other_ranks_load(train_prefix, tmp_path):
    from spawn_testlib import run_spawned

    results = run_spawned(_rank_job, 2, train_prefix, str(tmp_path / "cache"))
    assert [r["built"] for r in results] == [1, 0]
    assert torch.equal(results[0]["tokens"], results[1]["tokens"])


def test_errors(indexed):
    with pytest.raises(DataError, match="empty or outside"):
        GPTDataset(indexed, (10, 10), SEQ, 1, 10)
    with pytest.raises(DataError, match=r"fewer than one sample of seq_length \+ 1"):
        GPTDataset(indexed, (0, 1), 100_000, 1, 10)
    ds = GPTDataset(indexed, (0, 100), SEQ, 1, None)
    with pytest.raises(IndexError):
        ds[len(ds)]
