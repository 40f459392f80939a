"""Command line + optional config file -> (ModelConfig, TrainingConfig).

Precedence, lowest to highest: dataclass defaults < --preset < --config file < command-line flags.
The config file (YAML or JSON) is a flat mapping whose keys are flag names, with dashes or
underscores (`hidden-size: 64` or `hidden_size: 64`), plus `preset`.
"""
from __future__ import annotations

import argparse
import json
import math
import os

from megatron_mixln.cli import add_dataclass_args, config_from_flags, given_fields
from megatron_mixln.model import PRESETS, ModelConfig
from megatron_mixln.errors import ArgumentParser, UsageError
from megatron_mixln.training.config import TrainingConfig

_MODEL_FIELDS = {f for f in ModelConfig.__dataclass_fields__ if ModelConfig.__dataclass_fields__[f].init}
_TRAIN_FIELDS = {f for f in TrainingConfig.__dataclass_fields__ if TrainingConfig.__dataclass_fields__[f].init}
_EXTRA_FIELDS = {"preset"}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m megatron_mixln.pretrain",
        allow_abbrev=False,  # as Megatron-LM: `--train-iter 5` is an error, not --train-iters
        description="Pretrain a LLaMA-family model with a per-layer norm position (Mix-LN, Pre-LN, ...) on DeepSpeed.",
    )
    p.add_argument("--config", default=None, help="YAML/JSON file of flag values; flags given here override it")
    p.add_argument("--preset", default=argparse.SUPPRESS, help=f"model shape: {', '.join(PRESETS)}")
    add_dataclass_args(p, ModelConfig, "model")
    group = add_dataclass_args(p, TrainingConfig, "training", skip=("data_path", "valid_data_path"))
    for name in ("data_path", "valid_data_path"):
        group.add_argument("--" + name.replace("_", "-"), nargs="+", default=argparse.SUPPRESS,
                           metavar="[WEIGHT] PREFIX", help=TrainingConfig.__dataclass_fields__[name].metadata["help"])
    # Names DeepSpeed's launcher and Megatron-DeepSpeed users pass; accepted so scripts port unchanged.
    p.add_argument("--deepspeed_config", dest="deepspeed_config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    for name in ("override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler"):  # Megatron's spelling
        p.add_argument("--" + name.replace("_", "-").replace("opt-param", "opt_param"), dest=name,
                       action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def load_config_file(path: str) -> dict:
    """Flat mapping of flag names to values; keys normalised to field names."""
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    with open(path) as fh:
        text = fh.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # a parse error: name the file, keep the parser's message
        raise UsageError(f"--config {path}: cannot parse: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    # YAML reads `lr: 5e-4` (no dot) as a string: convert as the flag's own type would.
    numeric = {a.dest: a.type for a in build_parser()._actions if a.type in (int, float)}
    out = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in _MODEL_FIELDS | _TRAIN_FIELDS | _EXTRA_FIELDS:
            raise UsageError(f"--config {path}: unknown key {key!r} (not a flag of this program)")
        if name in numeric and isinstance(value, str):
            try:
                value = numeric[name](value)
            except ValueError:
                raise UsageError(f"--config {path}: {key}: expected {numeric[name].__name__}, got {value!r}") from None
        out[name] = value
    return out


def padded_vocab_size(tokenizer_vocab: int, divisible_by: int, tensor_parallel: int = 1) -> int:
    """Megatron's --make-vocab-size-divisible-by (times the TP size, so the shards are equal)."""
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(tokenizer_vocab / multiple) * multiple)


def checkpoint_vocab_size(train: TrainingConfig, tokenizer_vocab: int) -> int | None:
    """The padded vocabulary of the checkpoint --load resumes (its `latest` or --tag), which travels with
    it: a run at another --tensor-model-parallel-size keeps it when the new TP divides it (the padding
    rows were trained as they are). None without --load or a readable mixln_meta.json (--load's own
    checks then speak). Raises UsageError when the new TP cannot split those rows evenly."""
    from megatron_mixln.checkpoint.layout import META, read_latest

    if not train.load or not os.path.isdir(train.load):
        return None
    tag = train.tag or read_latest(train.load)
    try:
        with open(os.path.join(train.load, tag or "", META)) as fh:
            saved = int(json.load(fh)["model_config"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    tp = train.tensor_model_parallel_size
    if saved < tokenizer_vocab:
        return None  # another tokenizer: --load's shape check names the mismatch
    if saved % tp:
        fits = [n for n in (1, 2, 4, 8, 16, 32, 64) if saved % n == 0]
        raise UsageError(
            f"--load {train.load} ({tag}) holds a vocabulary padded to {saved} rows, which --tensor-model-parallel-size "
            f"{tp} cannot split evenly: resume with --tensor-model-parallel-size {' or '.join(map(str, fits))}")
    return saved


def parse_configs(argv: list[str] | None = None) -> tuple[ModelConfig, TrainingConfig]:
    ns = build_parser().parse_args(argv)
    values = load_config_file(ns.config) if ns.config else {}
    flags = {**given_fields(ns, ModelConfig), **given_fields(ns, TrainingConfig)}
    if "preset" in ns:
        flags["preset"] = ns.preset
    values.update(flags)  # flags beat the file
    return make_configs(values)


def make_configs(values: dict) -> tuple[ModelConfig, TrainingConfig]:
    """Field values (model and training mixed, plus `preset`) -> validated configs."""
    model_kw = {k: v for k, v in values.items() if k in _MODEL_FIELDS}
    train_kw = {k: v for k, v in values.items() if k in _TRAIN_FIELDS}
    train = TrainingConfig(**train_kw)
    if "vocab_size" not in model_kw and train.tokenizer:
        tokens = tokenizer_vocab_size(train.tokenizer)
        model_kw["vocab_size"] = (checkpoint_vocab_size(train, tokens)
                                  or padded_vocab_size(tokens, train.make_vocab_size_divisible_by,
                                                       train.tensor_model_parallel_size))
    model = config_from_flags(ModelConfig, model_kw, values.get("preset"))
    if train.tokenizer:
        check_tokenizer_vocab(train.tokenizer, model.vocab_size)
    return model, train


def tokenizer_vocab_size(spec: str) -> int:
    from megatron_mixln.data import DataError, build_tokenizer

    try:
        return build_tokenizer(spec).vocab_size
    except DataError as exc:
        raise UsageError(f"--tokenizer: {exc}") from None


def check_tokenizer_vocab(spec: str, model_vocab: int) -> None:
    """A model vocab smaller than the tokenizer's would index past the embedding table."""
    vocab = tokenizer_vocab_size(spec)
    if vocab > model_vocab:
        raise UsageError(
            f"--tokenizer {spec} has {vocab} tokens but the model's --vocab-size is {model_vocab}: ids "
            f"{model_vocab}..{vocab - 1} would index past the embedding table; drop --vocab-size (it then "
            f"defaults to the tokenizer's, padded to a multiple of --make-vocab-size-divisible-by) or raise it"
        )


def check_writable(path: str, flag: str) -> None:
    """Create the directory a flag names (e.g. --save) now, so a bad path fails before anything is built."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot create the directory: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable")
