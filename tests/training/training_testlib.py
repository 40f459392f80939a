"""Helpers shared by the training tests (uniquely named: test directories share sys.path).

Multi-process jobs use torch.multiprocessing.spawn with a file:// rendezvous and gloo pinned to
loopback; subprocesses of the entry point run without a launcher (a 1-rank file-store group),
so no test opens a socket on a non-loopback address.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from spawn_testlib import LOOPBACK_ENV, run_spawned  # noqa: F401  (re-exported for the tests)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PYTHON = sys.executable

TINY_MODEL = dict(vocab_size=256, hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=2,
                  seq_length=16, norm_position="mix", post_ln_layers=1)
TINY_TRAIN = dict(micro_batch_size=2, global_batch_size=4, train_iters=4, lr=1e-2, lr_warmup_iters=1,
                  eval_iters=1, eval_interval=1000, log_interval=1, grad_norm_interval=0, seed=7)


def tiny_model(**overrides):
    from megatron_mixln.model import ModelConfig

    return ModelConfig(**{**TINY_MODEL, **overrides})


def tiny_train(**overrides):
    from megatron_mixln.training.config import TrainingConfig

    return TrainingConfig(**{**TINY_TRAIN, **overrides})


class SyntheticTokens:
    """n samples of seq+1 random tokens: the dataset interface of megatron_mixln.data (item["tokens"])."""

    def __init__(self, n: int, seq_length: int = 16, vocab: int = 256, seed: int = 0):
        self.tokens = np.random.default_rng(seed).integers(0, vocab, (n, seq_length + 1), dtype=np.int64)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"tokens": self.tokens[i]}


def tiny_datasets(n_train=64, n_valid=16, seq_length=16, vocab=256):
    return SyntheticTokens(n_train, seq_length, vocab, 0), SyntheticTokens(n_valid, seq_length, vocab, 1)


def run_and_destroy(model_config, train_config, datasets):
    from megatron_mixln.training.trainer import pretrain

    summary = pretrain(model_config, train_config, datasets)
    summary.engine.destroy()
    return summary.to_dict()  # without the engine: plain data that crosses process boundaries


# --- multi-process jobs: spawn_testlib.run_spawned (shared with the other test directories) ---


# --- subprocesses of the entry point --------------------------------------------------------

def entry_env() -> dict:
    env = dict(os.environ, **LOOPBACK_ENV, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # no launcher: the entry point makes its own 1-rank group
    return env


def tiny_cli_args(data_prefix: str, **extra) -> list[str]:
    args = ["--vocab-size", "256", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-layers", "2",
            "--num-attention-heads", "2", "--seq-length", "16", "--norm-position", "mix", "--post-ln-layers", "1",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2", "--lr-warmup-iters", "1",
            "--eval-iters", "1", "--log-interval", "1", "--split", "90,10,0", "--train-iters", "2",
            "--data-path", data_prefix]  # later flags (extra) override these: argparse keeps the last
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def write_token_dataset(prefix: str, n_docs: int = 60, doc_len: int = 40, vocab: int = 256, seed: int = 0) -> str:
    """A small Megatron .bin/.idx pair of random documents, written with the data pipeline's writer."""
    from megatron_mixln.data import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for _ in range(n_docs):
            writer.add_document(rng.integers(0, vocab, doc_len))
    return prefix
