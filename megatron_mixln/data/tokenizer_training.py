"""Train a sentencepiece model (BPE or unigram) on JSON-lines text.

Documents are fed line by line (sentencepiece silently drops "sentences" longer than
``max_sentence_length``, and whole documents often are). The model is produced in memory and
written with temp-then-rename, with a ``.vocab`` (piece, score) next to it.

Default special ids follow T5's layout -- pad 0, eos 1, unk 2 -- plus bos 3; ``-1`` disables one.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Iterator

from .errors import DataError
from megatron_mixln.fileio import atomic_open, atomic_write_bytes
from .inputs import expand_inputs


@dataclass
class TokenizerTrainOptions:
    inputs: list[str]
    output_prefix: str  # writes <prefix>.model and <prefix>.vocab
    vocab_size: int = 8000
    model_type: str = "bpe"
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    pad_id: int = 0
    eos_id: int = 1
    unk_id: int = 2
    bos_id: int = 3
    character_coverage: float = 0.9995
    max_sentences: int = 5_000_000
    byte_fallback: bool = False
    split_digits: bool = False
    normalization_rule_name: str = "nmt_nfkc"  # sentencepiece's; "identity" leaves the text as it is
    num_threads: int = 1
    seed: int = 1234


def iter_text_lines(files: list[str], keys: list[str]) -> Iterator[str]:
    """Non-empty lines of the ``keys`` fields of every record; bad lines are skipped. Reads every
    container and encoding the preprocessor reads (``inputs``: compressed, UTF-16/32, BOM, Parquet).
    Raises DataError naming a file that cannot be read."""
    from .inputs import LineReader, ParquetReader, check_input, plan_file_tasks

    for path in files:
        encoding = check_input(path, keys)
        (task,) = plan_file_tasks([path], 1 << 62, {path: encoding})
        reader = ParquetReader(task, keys) if encoding == "parquet" else LineReader(task)
        for _, record in reader:
            try:
                obj = record if isinstance(record, dict) else json.loads(record, strict=False)
            except (ValueError, UnicodeDecodeError):
                continue
            if not isinstance(obj, dict):
                continue
            for key in keys:
                value = obj.get(key)
                if isinstance(value, str):
                    for line in value.splitlines():
                        if line.strip():
                            yield line


def _check(opts: TokenizerTrainOptions) -> list[str]:
    if opts.model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type {opts.model_type!r}: expected bpe or unigram")
    specials = {"--pad-id": opts.pad_id, "--eos-id": opts.eos_id, "--unk-id": opts.unk_id,
                "--bos-id": opts.bos_id}
    used = [v for v in specials.values() if v >= 0]
    if opts.unk_id < 0:
        raise DataError("--unk-id must be >= 0 (sentencepiece needs an unknown token)")
    if len(used) != len(set(used)) or any(v >= opts.vocab_size for v in used):
        raise DataError(f"special ids {specials} must be distinct and below --vocab-size "
                        f"{opts.vocab_size}")
    directory = os.path.dirname(os.path.abspath(opts.output_prefix))
    os.makedirs(directory, exist_ok=True)
    if not os.access(directory, os.W_OK):
        raise DataError(f"--output-prefix: {directory} is not writable")
    return expand_inputs(opts.inputs)


def train_tokenizer(opts: TokenizerTrainOptions) -> str:
    """Train and write the model; returns the path of the ``.model`` file."""
    import sentencepiece as spm

    files = _check(opts)
    spm.set_random_generator_seed(opts.seed)
    model = io.BytesIO()
    read_errors: list[DataError] = []

    def sentences() -> Iterator[str]:
        try:
            yield from iter_text_lines(files, opts.json_keys)
        except DataError as err:  # sentencepiece would turn it into a RuntimeError
            read_errors.append(err)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model,
            vocab_size=opts.vocab_size, model_type=opts.model_type,
            pad_id=opts.pad_id, eos_id=opts.eos_id, unk_id=opts.unk_id, bos_id=opts.bos_id,
            character_coverage=opts.character_coverage, input_sentence_size=opts.max_sentences,
            shuffle_input_sentence=True, byte_fallback=opts.byte_fallback,
            split_digits=opts.split_digits, normalization_rule_name=opts.normalization_rule_name,
            num_threads=opts.num_threads,
            train_extremely_large_corpus=False, minloglevel=2)
    except RuntimeError as err:
        if read_errors:
            raise read_errors[0] from None
        raise DataError(f"sentencepiece training on {len(files)} file(s) failed: {err} "
                        f"(too little text for --vocab-size {opts.vocab_size}? try a smaller "
                        f"one)") from None
    model_path = opts.output_prefix + ".model"
    atomic_write_bytes(model_path, model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with atomic_open(opts.output_prefix + ".vocab", "w") as fh:
        for i in range(sp.GetPieceSize()):
            fh.write(f"{sp.IdToPiece(i)}\t{sp.GetScore(i):g}\n")
    return model_path
