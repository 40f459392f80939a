"""--data-path parsing, Megatron's split, blending by weight, and the whole train/valid/test
build checked sample by sample against megatron-core's BlendedMegatronDatasetBuilder."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from megatron_mixln.data import (build_blending_indices, build_train_valid_test_datasets,
                                 parse_data_path, split_ranges)
from megatron_mixln.data.errors import DataError, IndexedDatasetError, TokenizerError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.mark.parametrize("given, prefixes, weights", [
    (["a"], ["a"], None),
    (["1", "a"], ["a"], [1.0]),
    (["0.3", "a", "0.7", "b"], ["a", "b"], [0.3, 0.7]),
    ("1 a 3 b", ["a", "b"], [0.25, 0.75]),
    (["a", "b"], ["a", "b"], None),
])
def test_parse_data_path(given, prefixes, weights):
    got_prefixes, got_weights = parse_data_path(given)
    assert got_prefixes == prefixes
    assert got_weights == weights if weights is None else np.allclose(got_weights, weights)


@pytest.mark.parametrize("bad", [[], ["0.3", "a", "b"], ["-1", "a"], ["0.5"], ["a", "0.5"]])
def test_parse_data_path_errors(bad):
    with pytest.raises(DataError, match="--data-path"):
        parse_data_path(bad)


@pytest.mark.parametrize("split", ["949,50,1", "98,2,0", "1", "80,10,10", "0,1,0", "3, 1, 1"])
@pytest.mark.parametrize("docs", [1, 7, 1000, 12345])
def test_split_ranges_match_megatron_core(split, docs):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    expected = [None if m is None else (int(round(m[0] * docs)), int(round(m[1] * docs)))
                for m in matrix]
    ours = split_ranges(split, docs)
    assert ours == expected
    covered = [r for r in ours if r is not None]
    assert covered[0][0] == 0 and covered[-1][1] == docs
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_blending_follows_the_weights_and_megatron_core():
    from megatron.core.datasets import helpers

    weights = [0.2, 0.3, 0.5]
    which, nth = build_blending_indices(weights, 5000)
    counts = np.stack([np.cumsum(which == j) for j in range(3)], axis=1)
    steps = np.arange(1, 5001)[:, None]
    assert np.abs(counts - steps * np.array(weights)).max() <= 1.0
    for j in range(3):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert np.array_equal(nth[which == j], np.arange((which == j).sum()))
    core_which = np.zeros(5000, np.int16)
    core_nth = np.zeros(5000, np.int64)
    helpers.build_blending_indices(core_which, core_nth, np.array(weights), 3, 5000, False)
    assert np.array_equal(which, core_which) and np.array_equal(nth, core_nth)


class _StubTokenizer:
    """What megatron-core's GPTDatasetConfig reads from a tokenizer."""
    vocab_size, eod, pad = 1000, 1, 0
    unique_identifiers = {"class": "stub"}


@pytest.mark.parametrize("blend", ["single", "weighted"])
def test_same_samples_as_megatron_core(train_prefix, tmp_path, blend):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset as CoreGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    copies = []
    for name in ("a", "b"):  # megatron-core puts its caches next to the data: use copies
        for ext in (".bin", ".idx"):
            shutil.copy(train_prefix + ext, str(tmp_path / name) + ext)
        copies.append(str(tmp_path / name))
    if blend == "single":
        core_blend, data_path = ([copies[0]], None), [copies[0]]
    else:
        core_blend, data_path = (copies, [0.3, 0.7]), ["0.3", copies[0], "0.7", copies[1]]
    sizes, seq = [600, 60, 6], 48
    config = GPTDatasetConfig(
        random_seed=77, sequence_length=seq, blend=core_blend, split="949,50,1",
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        tokenizer=_StubTokenizer(), path_to_cache=None)
    core = BlendedMegatronDatasetBuilder(CoreGPTDataset, sizes, lambda: True, config).build()
    ours = build_train_valid_test_datasets(data_path, "949,50,1", seq, 77, tuple(sizes),
                                           cache_dir=str(tmp_path / "cache"))
    for theirs, mine in zip(core, ours):
        assert len(mine) == len(theirs)
        for i in range(len(mine)):
            tokens = mine[i]["tokens"]
            assert np.array_equal(tokens[:-1], theirs[i]["tokens"].numpy())
            assert np.array_equal(tokens[1:], theirs[i]["labels"].numpy())


def test_blended_sample_counts_follow_weights(train_prefix, tmp_path):
    train, _, _ = build_train_valid_test_datasets(
        ["1", train_prefix, "3", train_prefix], "1", 32, 5, (2000, 0, 0))
    which = np.asarray(train.dataset_index)
    assert len(train) == 2000
    counts = np.stack([np.cumsum(which == j) for j in range(2)], axis=1)
    assert np.abs(counts - np.arange(1, 2001)[:, None] * [0.25, 0.75]).max() <= 1.0


def test_split_choices_and_missing_splits(train_prefix):
    train, valid, test = build_train_valid_test_datasets(train_prefix, "1", 32, 5, (100, 10, 0))
    assert len(train) >= 100 and valid is None and test is None
    _, valid, _ = build_train_valid_test_datasets(train_prefix, "90,10", 32, 5, (100, None, 0))
    assert valid is not None and valid.num_samples is None  # one full epoch of the split
    with pytest.raises(DataError, match="gives the train split no share"):
        build_train_valid_test_datasets(train_prefix, "0,1,0", 32, 5, (100, 10, 0))


def test_a_sample_count_of_more_than_100_epochs_warns(tmp_path):
    """10 documents x 50 tokens, seq_length 9: n samples take ceil((9 n + 1) / 500) epochs."""
    import math
    import warnings

    from megatron_mixln.data import IndexedDatasetWriter

    prefix = str(tmp_path / "small_text_document")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for d in range(10):
            writer.add_document(np.arange(50) + d)
    limit = max(n for n in range(5000, 6000) if math.ceil((9 * n + 1) / 500) <= 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 100 epochs exactly: silent
        build_train_valid_test_datasets(prefix, "1", 9, 5, (limit, 0, 0), cache_dir=str(tmp_path / "c"))
    with pytest.warns(UserWarning, match=rf"small_text_document: {limit + 1:,} train samples of 10 tokens need "
                                         r"101 epochs of the split's 500 tokens \(more than 100\); its sample "
                                         r"index will take ~\d+ MB"):
        build_train_valid_test_datasets(prefix, "1", 9, 5, (limit + 1, 0, 0), cache_dir=str(tmp_path / "c"))


def test_bad_data_paths_fail_before_any_index_is_built(train_prefix, tmp_path):
    cache = tmp_path / "cache"
    missing = str(tmp_path / "missing_text_document")
    with pytest.raises(IndexedDatasetError, match=f"{missing}.idx: not found"):
        build_train_valid_test_datasets(["0.5", train_prefix, "0.5", missing], "1", 32, 5,
                                        (100, 0, 0), cache_dir=str(cache))
    assert not cache.exists()


def test_model_vocabulary_is_checked_against_the_data(train_prefix, tmp_path):
    with open(train_prefix + ".summary.json") as fh:
        assert json.load(fh)["tokenizer"]["vocab_size"] == 1000
    build_train_valid_test_datasets(train_prefix, "1", 32, 5, (10, 0, 0), vocab_size=1024)
    with pytest.raises(TokenizerError, match=r"1000 ids but the model's --vocab-size is 512"):
        build_train_valid_test_datasets(train_prefix, "1", 32, 5, (10, 0, 0), vocab_size=512)
    assert os.path.exists(train_prefix + ".bin")
