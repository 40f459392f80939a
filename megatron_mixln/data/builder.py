"""From ``--data-path``/``--split`` to train/valid/test datasets, as Megatron's builder does.

    prefixes, weights = parse_data_path(["0.3", "c4_text_document", "0.7", "wiki_text_document"])
    train, valid, test = build_train_valid_test_datasets(
        ["c4_text_document"], "949,50,1", seq_length=256, seed=1234,
        train_valid_test_num_samples=(512_000, 5_120, 0), cache_dir="runs/cache")

Every data path is opened and checked before any index is built, so a typo fails at once with the
path in the message. Sizes follow megatron-core's ``BlendedMegatronDatasetBuilder`` case by case
(so its caches and ours agree, sample for sample):

  * one prefix without a weight: that dataset alone, ``n`` samples (``None``: one epoch);
  * prefixes with weights ``w`` (one prefix with a weight counts): each dataset is built for
    ``ceil(ceil(n * w) * 1.005)`` samples and the blend holds ``sum(ceil(n * w))``; a weighted
    blend needs a sample count (``None`` is refused, as megatron-core refuses it);
  * several prefixes without weights: one epoch of each, blended in proportion to those epoch
    lengths, ``min(n, total)`` samples -- capped, never more than one epoch -- or, for ``None``,
    every sample of every dataset exactly once.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

from .blended_dataset import BlendedDataset, normalize_weights
from .errors import DataError
from .gpt_dataset import GPTDataset
from .indexed_dataset import IndexedDataset
from .split import SPLIT_NAMES, split_ranges
from .tokenizer import check_vocab

BLEND_SURPLUS = 0.005  # megatron-core's mid_level_dataset_surplus


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _strip_extension(prefix: str) -> str:
    """Accept ``x.bin``/``x.idx`` for prefix ``x`` (a common slip)."""
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext) and not os.path.exists(prefix + ".idx"):
            return prefix[:-len(ext)]
    return prefix


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float] | None]:
    """``["0.3", "a", "0.7", "b"]`` -> (["a", "b"], [0.3, 0.7]); ``["a", "b"]`` -> (["a", "b"], None).

    Prefixes without weights -> weights None ("one epoch each, in proportion to their sizes");
    ``["a"]`` -> (["a"], None) while ``["1", "a"]`` -> (["a"], [1.0]): megatron-core builds those
    two differently (the second as a one-dataset blend with the 0.5 % surplus), and so do we.
    Raises DataError for an empty list, unpaired tokens or weights that are not finite and > 0.
    """
    tokens = data_path.split() if isinstance(data_path, str) else [str(t) for t in data_path]
    if not tokens:
        raise DataError("--data-path is empty; expected PREFIX or WEIGHT PREFIX [WEIGHT PREFIX ...]")
    numeric = [_is_number(t) for t in tokens]
    if not any(numeric):
        prefixes = [_strip_extension(t) for t in tokens]
        return prefixes, None
    if len(tokens) % 2 or numeric[0::2] != [True] * (len(tokens) // 2) or any(numeric[1::2]):
        raise DataError(f"--data-path {' '.join(tokens)!r}: expected WEIGHT PREFIX pairs like "
                        f"'0.3 a_text_document 0.7 b_text_document', or prefixes only")
    weights = [float(t) for t in tokens[0::2]]
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise DataError(f"--data-path weights {weights} must be > 0")
    return [_strip_extension(t) for t in tokens[1::2]], normalize_weights(weights)


def check_data_vocab(prefix: str, model_vocab_size: int) -> None:
    """Compare the vocabulary recorded by ``preprocess_c4`` next to ``prefix`` with the model's."""
    summary = prefix + ".summary.json"
    if not os.path.isfile(summary):
        return  # made by other tooling: nothing recorded to compare
    with open(summary, encoding="utf-8") as fh:
        vocab = json.load(fh).get("tokenizer", {}).get("vocab_size")
    if vocab is not None:
        check_vocab(int(vocab), model_vocab_size, f"{prefix} (tokenizer recorded in {summary})")


def build_train_valid_test_datasets(
        data_path: Sequence[str] | str, split: str, seq_length: int, seed: int,
        train_valid_test_num_samples: tuple[int | None, int | None, int | None],
        cache_dir: str | None = None, vocab_size: int | None = None):
    """``(train, valid, test)``; a split is None when 0 samples are asked or its share is 0.

    A sample count of None builds exactly one epoch of that split (e.g. a full validation pass).
    ``vocab_size`` (the model's) is checked against the tokenizer recorded with the data.
    """
    prefixes, weights = parse_data_path(data_path)
    indexed = [IndexedDataset(p) for p in prefixes]  # fails here, naming the path, if unusable
    if vocab_size is not None:
        for prefix in prefixes:
            check_data_vocab(prefix, vocab_size)
    if len(train_valid_test_num_samples) != 3:
        raise DataError("train_valid_test_num_samples must have three entries")
    ranges = [split_ranges(split, len(ds)) for ds in indexed]
    out = []
    for i, name in enumerate(SPLIT_NAMES):
        n = train_valid_test_num_samples[i]
        if n is not None and n <= 0:
            out.append(None)
            continue
        if all(r[i] is None for r in ranges):
            if name == "train":
                raise DataError(f"--split {split!r} gives the train split no share, but {n} "
                                f"train samples were requested")
            out.append(None)
            continue
        for prefix, ds, r in zip(prefixes, indexed, ranges):
            if r[i] is None or r[i][0] >= r[i][1]:
                raise DataError(f"{prefix}: --split {split!r} leaves the {name} split no "
                                f"documents (the dataset has {len(ds)})")
        out.append(_build_split(prefixes, indexed, weights, [r[i] for r in ranges], name,
                                seq_length, seed, n, cache_dir))
    return tuple(out)


def _build_split(prefixes, indexed, weights, ranges, name, seq_length, seed, n, cache_dir):
    """One split, by megatron-core's cases (see the module docstring)."""
    if len(indexed) == 1 and weights is None:
        return GPTDataset(indexed[0], ranges[0], seq_length, seed, n, cache_dir, name)
    if weights is None:  # one epoch of each; the blend follows their sizes
        parts = [GPTDataset(ds, r, seq_length, seed, None, cache_dir, name)
                 for ds, r in zip(indexed, ranges)]
        weights = [len(p) for p in parts]
        size = None if n is None else min(n, sum(weights))
    elif n is None:
        raise DataError(f"the {name} split: a blend with weights "
                        f"({', '.join(f'{w:g} {p}' for w, p in zip(weights, prefixes))}) needs a "
                        f"sample count (megatron-core refuses a weighted blend of unspecified size); "
                        f"give the prefixes without weights to use one epoch of each")
    else:
        targets = [math.ceil(n * w) for w in weights]
        parts = [GPTDataset(ds, r, seq_length, seed, math.ceil(t * (1 + BLEND_SURPLUS)),
                            cache_dir, name)
                 for ds, r, t in zip(indexed, ranges, targets)]
        size = sum(targets)
    description = {"split": name, "parts": [[os.path.abspath(p), list(r), len(d)]
                                            for p, r, d in zip(prefixes, ranges, parts)]}
    return BlendedDataset(parts, weights, size, cache_dir, description)
