#!/usr/bin/env python
"""Train a sentencepiece tokenizer (BPE or unigram) on JSON-lines text (.json/.jsonl, gzipped or not).

    python tools/train_tokenizer.py --input 'data/sample_c4/c4-train.*.json.gz' \\
        --output-prefix data/spm8k --vocab-size 8000 --model-type bpe

writes data/spm8k.model (use it as --tokenizer) and data/spm8k.vocab. Special ids default to T5's
layout (pad 0, eos 1, unk 2) plus bos 3; pass -1 to leave one out.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_mixln.data.errors import DataError  # noqa: E402
from megatron_mixln.data.tokenizer_training import (TokenizerTrainOptions,  # noqa: E402
                                                    train_tokenizer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", action="append", required=True, help="files/globs (repeatable)")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.model and .vocab")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--pad-id", type=int, default=0)
    p.add_argument("--eos-id", type=int, default=1)
    p.add_argument("--unk-id", type=int, default=2)
    p.add_argument("--bos-id", type=int, default=3)
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-sentences", type=int, default=5_000_000,
                   help="sample at most this many lines for training")
    p.add_argument("--byte-fallback", action="store_true", help="unknown characters become bytes")
    p.add_argument("--split-digits", action="store_true")
    p.add_argument("--normalization-rule-name", default="nmt_nfkc",
                   choices=["nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity"],
                   help="sentencepiece's normaliser applied before encoding (default nmt_nfkc)")
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    opts = TokenizerTrainOptions(
        inputs=a.input, output_prefix=a.output_prefix, vocab_size=a.vocab_size,
        model_type=a.model_type, json_keys=a.json_keys, pad_id=a.pad_id, eos_id=a.eos_id,
        unk_id=a.unk_id, bos_id=a.bos_id, character_coverage=a.character_coverage,
        max_sentences=a.max_sentences, byte_fallback=a.byte_fallback,
        split_digits=a.split_digits, normalization_rule_name=a.normalization_rule_name,
        num_threads=a.num_threads, seed=a.seed)
    try:
        path = train_tokenizer(opts)
    except DataError as err:
        print(f"train_tokenizer: error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
