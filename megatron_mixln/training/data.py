"""From --data-path to per-rank micro-batches. The datasets and the sampler are the data
pipeline's (megatron_mixln.data); this file only decides how many samples each split needs and
which ones each data-parallel rank reads.

Train: the dataset's sample order is already a seeded shuffle; the sampler walks it in order from
`consumed_samples`, so a resumed run sees exactly the samples the uninterrupted run would have.
Validation: always the first eval_iters x global_batch samples of the validation split, sharded over
data-parallel ranks, so every evaluation (and every world size) scores the same tokens. With
--eval-tokens N: the first samples holding N target tokens, the last one cut (`eval_token_budgets`).

--sample-mode truncate-pad: one document per sample (data.DocumentDataset). A micro-batch is then an
int64 (micro, seq+1) tensor whose padding positions hold loss.IGNORE (-1); `loss.split_batch` turns it
into inputs, labels and a loss mask.
"""
from __future__ import annotations

import functools
import os
from typing import Iterator

import numpy as np
import torch

from megatron_mixln.errors import UsageError
from megatron_mixln.training.config import TrainingConfig
from megatron_mixln.training.loss import IGNORE


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


def validation_samples(cfg: TrainingConfig, seq_length: int, global_batch_size: int) -> int | None:
    """Validation samples to build: eval_iters x global batch; with --eval-tokens (packed) enough
    seq_length-token samples, rounded up to whole global batches; None = one epoch (truncate-pad)."""
    if cfg.eval_tokens:
        if cfg.sample_mode == "truncate-pad":
            return None
        return -(-(-(-cfg.eval_tokens // seq_length)) // global_batch_size) * global_batch_size
    return cfg.eval_iters * global_batch_size


def _document_datasets(cfg: TrainingConfig, seq_length: int, n_train: int, n_valid, pad_id: int):
    from megatron_mixln.data import DocumentDataset, IndexedDataset, parse_data_path, split_ranges

    def one(data_path, split, index, n, name, flag):
        prefixes, _ = parse_data_path(list(data_path))
        if len(prefixes) != 1:
            raise UsageError(f"{flag}: --sample-mode truncate-pad takes one dataset prefix, not a blend")
        indexed = IndexedDataset(prefixes[0])
        rng = split_ranges(split, len(indexed))[index]
        if rng is None or rng[0] >= rng[1]:
            raise UsageError(f"{flag} {prefixes[0]}: --split {split} leaves the {name} split no documents")
        return DocumentDataset(indexed, rng, seq_length, cfg.seed, n, pad_id, name)

    train = one(cfg.data_path, "1,0,0" if cfg.valid_data_path else cfg.split, 0, n_train, "train", "--data-path")
    valid = None
    if n_valid != 0:
        if cfg.valid_data_path:
            valid = one(cfg.valid_data_path, "0,1,0", 1, None, "valid", "--valid-data-path")
        else:
            valid = one(cfg.data_path, cfg.split, 1, None, "valid", "--data-path")
    return train, valid


def build_datasets(cfg: TrainingConfig, seq_length: int, global_batch_size: int, vocab_size: int | None = None,
                   pad_id: int = 0):
    """(train, valid) datasets, each item {"tokens": int64 array of seq_length + 1}. With `vocab_size`
    (the model's), the tokenizer recorded beside the data is checked against it.

    --valid-data-path given: all of --data-path trains and all of --valid-data-path validates
    (--split is not used); otherwise --split divides the documents of --data-path.
    """
    from megatron_mixln.data import build_train_valid_test_datasets

    check_data_path(cfg.data_path)
    from megatron_mixln.training.rollback import rollback_data_slack

    n_train = cfg.train_iters * global_batch_size + rollback_data_slack(cfg, global_batch_size)
    n_valid = validation_samples(cfg, seq_length, global_batch_size)
    if cfg.sample_mode == "truncate-pad":
        if cfg.valid_data_path:
            check_data_path(cfg.valid_data_path, "--valid-data-path")
        train, valid = _document_datasets(cfg, seq_length, n_train, n_valid, pad_id)
        where = "--valid-data-path" if cfg.valid_data_path else f"--split {cfg.split} of --data-path"
        _check_valid_size(valid, n_valid, where, cfg, global_batch_size)
        return train, valid
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
    _check_valid_size(valid, n_valid, where, cfg, global_batch_size)
    return train, valid


def _check_valid_size(valid, n_valid, where, cfg, global_batch_size) -> None:
    if n_valid and (valid is None or len(valid) < n_valid):
        need = (f"--eval-tokens {cfg.eval_tokens}" if cfg.eval_tokens
                else f"--eval-iters {cfg.eval_iters} x global batch {global_batch_size}")
        raise UsageError(
            f"{where}: the validation data has {0 if valid is None else len(valid)} samples, but {need} needs "
            f"{n_valid}; give validation more data or lower it (--eval-iters 0 disables evaluation)"
        )


def _sample(dataset, i: int, budget: int | None = None) -> np.ndarray:
    """Sample i's seq+1 tokens; padding (after `num_tokens`) and targets past `budget` set to IGNORE."""
    item = dataset[i]
    tokens = np.array(item["tokens"], dtype=np.int64)
    if "num_tokens" in item:
        tokens[item["num_tokens"]:] = IGNORE
    if budget is not None:
        tokens[budget + 1:] = IGNORE  # targets are tokens[1:]: keep the first `budget` of them
    return tokens


def _collate(dataset, indices, budgets=None) -> torch.Tensor:
    return torch.from_numpy(np.stack([_sample(dataset, i, None if budgets is None else budgets[i]) for i in indices]))


def eval_token_budgets(dataset, eval_tokens: int, seq_length: int, multiple: int) -> list[int]:
    """Per validation sample, how many of its targets count, so that the total is exactly
    `eval_tokens`: whole samples in order, the last one cut, then zero-budget samples up to a
    multiple of `multiple` (micro x data-parallel size: every rank runs the same number of batches).
    UsageError when the validation data holds fewer target tokens."""
    budgets, left = [], eval_tokens
    counts = getattr(dataset, "num_tokens", None)
    for i in range(len(dataset)):
        if left == 0:
            break
        targets = max((counts(i) if counts else seq_length + 1) - 1, 0)
        budgets.append(min(targets, left))
        left -= budgets[-1]
    if left:
        raise UsageError(f"--eval-tokens {eval_tokens}: the validation data holds only {eval_tokens - left} "
                         "target tokens; give it more data or lower --eval-tokens")
    budgets += [0] * (-len(budgets) % multiple)
    return budgets


def micro_batches(dataset, total_samples: int, consumed_samples: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int, budgets=None) -> Iterator[torch.Tensor]:
    """This rank's micro-batches ((micro, seq+1) int64) from sample `consumed_samples` on."""
    from megatron_mixln.data import PretrainingSampler

    sampler = PretrainingSampler(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size, drop_last=True)
    for indices in sampler:
        yield _collate(dataset, indices, budgets)


def validation_batches(dataset, num_samples: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int, budgets: list[int] | None = None) -> Iterator[torch.Tensor]:
    """With `budgets` (eval_token_budgets), num_samples = len(budgets) and targets past each budget are masked."""
    return micro_batches(dataset, num_samples, 0, micro_batch_size, dp_rank, dp_size, budgets)
