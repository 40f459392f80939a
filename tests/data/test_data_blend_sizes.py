"""Every blend size computation against megatron-core's BlendedMegatronDatasetBuilder: weights
given or inferred from sizes, one split or blends per split, requested sample counts or None (one
epoch), very small and very unequal weights. Compared index array by index array (which fixes
every sample), length by length, and token by token on a few samples."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_mixln.data import (BlendedDataset, build_exhaustive_blending_indices,
                                 build_train_valid_test_datasets, merge_indexed_datasets)
from megatron_mixln.data.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

SEQ, SEED = 48, 91


class _StubTokenizer:
    """What megatron-core's GPTDatasetConfig reads from a tokenizer."""
    vocab_size, eod, pad = 1000, 1, 0
    unique_identifiers = {"class": "stub"}


@pytest.fixture(scope="module")
def prefixes(train_prefix, tmp_path_factory) -> dict:
    """'big' (the whole train set, ~2750 documents), 'mid' (its first 1000), 'tiny' (first 150).

    Every split below leaves each dataset at least one document: megatron-core loops forever on an
    empty split (its epoch count never reaches the request), where ours stops with a DataError.
    """
    out = tmp_path_factory.mktemp("blend")
    made = {"big": train_prefix}
    for name, docs in (("mid", 1000), ("tiny", 150)):
        merge_indexed_datasets([train_prefix], str(out / name), max_documents=docs)
        made[name] = str(out / name)
    return made


def _core_build(blend, blend_per_split, split, sizes):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset as CoreGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=SEED, sequence_length=SEQ, blend=blend, blend_per_split=blend_per_split,
        split=split, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        tokenizer=_StubTokenizer(), path_to_cache=None)  # None: built in memory
    return BlendedMegatronDatasetBuilder(CoreGPTDataset, list(sizes), lambda: True, config).build()


def _same_gpt(mine, theirs) -> None:
    assert len(mine) == len(theirs)
    for name in ("document_index", "sample_index", "shuffle_index"):
        ours, core = np.asarray(getattr(mine, name)), np.asarray(getattr(theirs, name))
        assert ours.dtype == core.dtype and np.array_equal(ours, core), name


def _same(mine, theirs) -> None:
    if theirs is None or len(theirs) == 0:
        assert mine is None or len(mine) == 0
        return
    assert len(mine) == len(theirs)
    if hasattr(theirs, "dataset_index"):
        assert isinstance(mine, BlendedDataset)
        assert np.array_equal(mine.dataset_index, theirs.dataset_index)
        assert np.array_equal(mine.dataset_sample_index, theirs.dataset_sample_index)
        for a, b in zip(mine.datasets, theirs.datasets):
            _same_gpt(a, b)
    else:
        _same_gpt(mine, theirs)
    for i in sorted({0, 1, len(theirs) // 2, len(theirs) - 1}):
        tokens = mine[i]["tokens"]
        assert np.array_equal(tokens[:-1], theirs[i]["tokens"].numpy())
        assert np.array_equal(tokens[1:], theirs[i]["labels"].numpy())


# (blend as ["weight", prefix, ...] or [prefix, ...], split, train/valid/test sample counts)
CASES = [
    (["big"], "949,50,1", (600, 60, 6)),
    (["big"], "90,10,0", (600, None, 0)),
    (["1", "big"], "949,50,1", (600, 60, 6)),  # one prefix with a weight: a one-dataset blend
    (["0.3", "big", "0.7", "mid"], "949,50,1", (600, 60, 6)),
    (["0.3", "big", "0.7", "mid"], "98,2,0", (3000, 7, 0)),  # several epochs of 'mid'
    (["0.001", "big", "0.999", "mid"], "949,50,1", (600, 60, 6)),  # tiny weight: ceil(0.6) = 1
    (["1e-4", "tiny", "0.5", "big", "0.4999", "mid"], "1", (700, 0, 0)),
    (["5", "mid", "1", "big"], "80,20", (555, 33, 0)),  # weights that need normalizing
    (["big", "mid"], "949,50,1", (300, 30, 3)),  # inferred from sizes (the reported 301 vs 300)
    (["big", "tiny"], "90,8,2", (10**6, 10**6, 10**6)),  # capped at one epoch of each
    (["big", "mid", "tiny"], "90,10,0", (400, None, 0)),  # None: every sample exactly once
    (["tiny", "big"], "1", (None, 0, 0)),
]


def _resolve(tokens, prefixes):
    return [prefixes.get(t, t) for t in tokens]


def _core_blend(tokens):
    if any(t.replace(".", "").replace("e-", "").isdigit() for t in tokens[:1]):
        return tokens[1::2], [float(w) for w in tokens[0::2]]
    return tokens, None


@pytest.mark.parametrize("blend, split, sizes", CASES)
def test_blend_sizes_match_megatron_core(prefixes, tmp_path, blend, split, sizes):
    data_path = _resolve(blend, prefixes)
    core = _core_build(_core_blend(data_path), None, split, sizes)
    ours = build_train_valid_test_datasets(data_path, split, SEQ, SEED, sizes,
                                           cache_dir=str(tmp_path / "ours"))
    for theirs, mine in zip(core, ours):
        _same(mine, theirs)


@pytest.mark.parametrize("train, valid, sizes", [
    (["0.3", "big", "0.7", "mid"], ["mid", "tiny"], (500, None, 0)),
    (["big", "tiny"], ["0.2", "mid", "0.8", "tiny"], (500, 50, 0)),
    (["big"], ["tiny", "mid"], (100, 40, 0)),
])
def test_blend_per_split_matches_megatron_core(prefixes, tmp_path, train, valid, sizes):
    """--valid-data-path: the trainer builds train and valid from separate blends."""
    train, valid = _resolve(train, prefixes), _resolve(valid, prefixes)
    core = _core_build(None, [_core_blend(train), _core_blend(valid), None], None, sizes)
    mine_train = build_train_valid_test_datasets(train, "1,0,0", SEQ, SEED, (sizes[0], 0, 0),
                                                 cache_dir=str(tmp_path / "ours"))[0]
    mine_valid = build_train_valid_test_datasets(valid, "0,1,0", SEQ, SEED, (0, sizes[1], 0),
                                                 cache_dir=str(tmp_path / "ours"))[1]
    _same(mine_train, core[0])
    _same(mine_valid, core[1])


def test_weighted_blend_without_a_size_is_refused_as_in_megatron_core(prefixes, tmp_path):
    data_path = ["0.5", prefixes["big"], "0.5", prefixes["mid"]]
    with pytest.raises(AssertionError):  # megatron-core's own check
        _core_build(_core_blend(data_path), None, "90,10,0", (100, None, 0))
    with pytest.raises(DataError, match=r"valid split: a blend with weights .* needs a sample "
                                        r"count"):
        build_train_valid_test_datasets(data_path, "90,10,0", SEQ, SEED, (100, None, 0))


@pytest.mark.parametrize("sizes", [[1], [3, 1], [5, 5, 1], [1, 200, 7], [123, 4567]])
def test_exhaustive_blending_matches_megatron_core(sizes):
    from megatron.core.datasets import helpers

    which, nth = build_exhaustive_blending_indices(sizes)
    core_which = np.zeros(sum(sizes), np.int16)
    core_nth = np.zeros(sum(sizes), np.int64)
    helpers.build_exhaustive_blending_indices(core_which, core_nth, np.array(sizes, np.int64),
                                              len(sizes))
    assert np.array_equal(which, core_which) and np.array_equal(nth, core_nth)
    for j, n in enumerate(sizes):  # each sample of each dataset exactly once, in order
        assert np.array_equal(nth[which == j], np.arange(n))
