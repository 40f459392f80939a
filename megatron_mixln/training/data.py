"""From --data-path to per-rank micro-batches. The datasets and the sampler are the data
pipeline's (megatron_mixln.data); this file only decides how many samples each split needs and
which ones each data-parallel rank reads.

Train: the dataset's sample order is already a seeded shuffle; the sampler walks it in order from
`consumed_samples`, so a resumed run sees exactly the samples the uninterrupted run would have.
Validation: always the first eval_iters x global_batch samples of the validation split, sharded over
data-parallel ranks, so every evaluation (and every world size) scores the same tokens.
"""
from __future__ import annotations

import functools
import os
from typing import Iterator

import numpy as np
import torch

from megatron_mixln.training.config import TrainingConfig, UsageError


def check_data_path(data_path: list[str] | None, flag: str = "--data-path") -> None:
    """Fail before training if a prefix is missing its .bin/.idx pair (or weights are malformed)."""
    if not data_path:
        raise UsageError(f"{flag}: required (an indexed dataset prefix, e.g. data/c4_text_document)")
    from megatron_mixln.data import parse_data_path
    from megatron_mixln.data.indexed_dataset import missing_prefix_hint

    try:
        prefixes, _ = parse_data_path(list(data_path))
    except ValueError as exc:
        raise UsageError(f"{flag} {' '.join(data_path)}: {exc}") from None
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            path = prefix + ext
            if not os.path.isfile(path):
                raise UsageError(f"{flag}: {path} does not exist (expected the pair {prefix}.bin/.idx)"
                                 + missing_prefix_hint(prefix))
            if not os.access(path, os.R_OK):
                raise UsageError(f"{flag}: {path} is not readable")


def build_datasets(cfg: TrainingConfig, seq_length: int, global_batch_size: int, vocab_size: int | None = None):
    """(train, valid) datasets, each item {"tokens": int64 array of seq_length + 1}. With `vocab_size`
    (the model's), the tokenizer recorded beside the data is checked against it.

    --valid-data-path given: all of --data-path trains and all of --valid-data-path validates
    (--split is not used); otherwise --split divides the documents of --data-path.
    """
    from megatron_mixln.data import build_train_valid_test_datasets

    check_data_path(cfg.data_path)
    n_train, n_valid = cfg.train_iters * global_batch_size, cfg.eval_iters * global_batch_size
    build = functools.partial(build_train_valid_test_datasets, seq_length=seq_length, seed=cfg.seed,
                              cache_dir=cfg.data_cache_path, vocab_size=vocab_size)
    if cfg.valid_data_path:
        check_data_path(cfg.valid_data_path, "--valid-data-path")
        train = build(list(cfg.data_path), "1,0,0", train_valid_test_num_samples=(n_train, 0, 0))[0]
        valid = build(list(cfg.valid_data_path), "0,1,0", train_valid_test_num_samples=(0, n_valid, 0))[1] \
            if n_valid else None
        where = f"--valid-data-path {' '.join(cfg.valid_data_path)}"
    else:
        train, valid, _ = build(list(cfg.data_path), cfg.split, train_valid_test_num_samples=(n_train, n_valid, 0))
        where = f"--split {cfg.split} of --data-path"
    if train is None or len(train) == 0:
        raise UsageError(f"--data-path {' '.join(cfg.data_path)}: no training samples")
    if len(train) < n_train:  # only an unweighted blend is capped (at one epoch, as megatron-core)
        raise UsageError(
            f"--data-path {' '.join(cfg.data_path)}: a blend of prefixes without weights uses one "
            f"epoch of each ({len(train)} samples, as megatron-core), but --train-iters "
            f"{cfg.train_iters} x global batch {global_batch_size} needs {n_train}; give weights "
            "(e.g. --data-path 0.5 A 0.5 B) to repeat the data, or lower --train-iters"
        )
    if n_valid and (valid is None or len(valid) < n_valid):
        raise UsageError(
            f"{where}: the validation data has {0 if valid is None else len(valid)} samples, but "
            f"--eval-iters {cfg.eval_iters} x global batch {global_batch_size} needs {n_valid}; "
            "give validation more data or lower --eval-iters (0 disables evaluation)"
        )
    return train, valid


def _collate(dataset, indices) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(dataset[i]["tokens"], dtype=np.int64) for i in indices]))


def micro_batches(dataset, total_samples: int, consumed_samples: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int) -> Iterator[torch.Tensor]:
    """This rank's micro-batches ((micro, seq+1) int64) from sample `consumed_samples` on."""
    from megatron_mixln.data import PretrainingSampler

    sampler = PretrainingSampler(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size, drop_last=True)
    for indices in sampler:
        yield _collate(dataset, indices)


def validation_batches(dataset, num_samples: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int) -> Iterator[torch.Tensor]:
    return micro_batches(dataset, num_samples, 0, micro_batch_size, dp_rank, dp_size)
