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


def _core_indices(lengths, documents, seq, seed, n):
    """megatron-core's three arrays, built with its own functions and C++ helpers."""
    from megatron.core.datasets import helpers
    from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index

    per_epoch_tokens = int(lengths[documents].sum())
    per_epoch = (per_epoch_tokens - 1) // seq
    epochs = 1 if n is None else -(-(n * seq + 1) // per_epoch_tokens)
    sans_final = ((epochs - 1) * per_epoch_tokens - 1) // seq
    separate = epochs > 1 and n - sans_final < int(0.8 * per_epoch)
    rng = np.random.RandomState(seed)
    doc_index = _build_document_index(documents, epochs, rng, separate)
    sample_index = helpers.build_sample_idx(lengths, doc_index, seq, epochs, per_epoch_tokens,
                                            True, True)
    total = sample_index.shape[0] - 1
    shuffle_index = _build_shuffle_index(sans_final if separate else total, total, rng)
    return {"document_index": doc_index, "sample_index": sample_index,
            "shuffle_index": shuffle_index}, separate


def _assert_same(ours, core):
    for name in ("document_index", "sample_index", "shuffle_index"):
        assert ours[name].dtype == core[name].dtype, (name, ours[name].dtype, core[name].dtype)
        assert ours[name].shape == core[name].shape, name
        assert np.array_equal(ours[name], core[name]), name


@pytest.mark.parametrize("epochs_wanted", [None, 0.5, 2.9, 3.05, 7.5])
def test_indices_equal_megatron_core(indexed, epochs_wanted):
    """Document, sample and shuffle indices (values and dtypes) against megatron-core's own (C++)
    helpers, including multi-epoch builds where the final epoch is shuffled separately (3.05, 7.5)."""
    documents = np.arange(50, 1550, dtype=np.int32)
    lengths = indexed.sequence_lengths
    per_epoch = (int(lengths[documents].sum()) - 1) // SEQ
    n = None if epochs_wanted is None else int(epochs_wanted * per_epoch)
    ours = gpt_module.build_gpt_indices(lengths, (50, 1550), SEQ, 1234, n)
    core, separate = _core_indices(lengths, documents, SEQ, 1234, n)
    assert separate == (epochs_wanted in (3.05, 7.5))
    _assert_same(ours, core)
    assert ours["sample_index"].dtype == np.int32 and ours["shuffle_index"].dtype == np.uint32
    assert n is None or len(ours["sample_index"]) - 1 >= n


@pytest.mark.parametrize("seq", [2, 7, 300])
def test_indices_equal_megatron_core_edge_lengths(tmp_path, seq):
    """Documents of 1 token, documents longer than a sample, samples ending exactly on a document
    boundary (all lengths a multiple of seq), a sample longer than most documents; several epochs."""
    from megatron_mixln.data import IndexedDatasetWriter

    rng = np.random.default_rng(seq)
    sizes = np.concatenate([rng.integers(1, 3, 40), rng.integers(1, 4 * seq + 2, 300),
                            np.full(30, seq), np.full(30, 2 * seq)])
    rng.shuffle(sizes)
    with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as writer:
        for n in sizes:
            writer.add_document(rng.integers(0, 100, n))
    lengths = IndexedDataset(str(tmp_path / "d")).sequence_lengths
    for begin, end, n in ((0, 400, None), (10, 390, int(3.3 * lengths[10:390].sum()) // seq)):
        ours = gpt_module.build_gpt_indices(lengths, (begin, end), seq, 17, n)
        core, _ = _core_indices(lengths, np.arange(begin, end, dtype=np.int32), seq, 17, n)
        _assert_same(ours, core)


def test_sample_index_dtype_is_megatron_cores_choice():
    """int64 exactly when the document-index length or the longest sequence passes int32."""
    small, big = np.array([5, 7], np.int32), np.array([5, 2**31 - 1], np.int32)
    assert gpt_module.sample_index_dtype(2**31 - 1, small) == np.int32
    assert gpt_module.sample_index_dtype(2**31, small) == np.int64
    assert gpt_module.sample_index_dtype(10, big) == np.int32
    sample = gpt_module.build_sample_index(np.array([3, 4, 5], np.int32), 4, 2, np.dtype(np.int64))
    assert sample.dtype == np.int64 and sample.tolist() == [[0, 0], [1, 1], [2, 1]]


def test_sample_index_chunks_agree(indexed, monkeypatch):
    """The chunked sample-index build gives the same answer for any chunk size."""
    whole = gpt_module.build_gpt_indices(indexed.sequence_lengths, (0, 1000), SEQ, 5, 3000)
    monkeypatch.setattr(gpt_module, "_CHUNK", 7)
    chunked = gpt_module.build_gpt_indices(indexed.sequence_lengths, (0, 1000), SEQ, 5, 3000)
    for name in whole:
        assert np.array_equal(whole[name], chunked[name]), name


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
