#!/usr/bin/env python
"""Tokenize a JSON-lines corpus (C4 or any) into Megatron indexed datasets.

    python tools/preprocess_c4.py --input 'data/c4/c4-train.*.json.gz' \\
        --tokenizer data/spm.model --output-prefix data/c4_train --append-eod --workers 8

writes ``data/c4_train_text_document.bin/.idx`` (readable by Megatron-LM, GPT-NeoX and
megatron-core) and ``..._text_document.summary.json``. A killed run resumes where it stopped when
rerun with the same arguments. Flags follow Megatron's ``tools/preprocess_data.py`` where it has one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_mixln.data.errors import DataError  # noqa: E402
from megatron_mixln.data.preprocess import PreprocessOptions, run_preprocess  # noqa: E402


def parse_args(argv=None) -> PreprocessOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                allow_abbrev=False)
    src = p.add_argument_group("input")
    src.add_argument("--input", action="append", default=[], metavar="PATH",
                     help=".json/.jsonl files (plain, .gz, .zst, .xz or .bz2) or .parquet files, globs "
                     "or directories (repeatable)")
    src.add_argument("--hf-dataset", help="Hugging Face dataset name (streamed, e.g. allenai/c4) "
                     "or a local directory/JSON-lines file that `datasets` can load")
    src.add_argument("--hf-config", help="dataset config, e.g. en")
    src.add_argument("--hf-split", default="train")
    src.add_argument("--json-keys", nargs="+", default=["text"],
                     help="keys to extract; one output per key (default: text)")
    src.add_argument("--max-docs", type=int, help="keep only the first N documents")
    src.add_argument("--strict", action="store_true",
                     help="fail on the first bad line instead of counting it")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                     help="sentencepiece .model, tokenizer.json (or its directory), or null:N")
    tok.add_argument("--tokenizer-backend", choices=["auto", "sentencepiece", "hf", "gigatoken"],
                     default="auto",
                     help="library that encodes (ids never change): sentencepiece for a .model, hf "
                     "(tokenizers) for a tokenizer.json, gigatoken where it is shown exact for the "
                     "tokenizer's kind; auto: gigatoken where exact and installed, else the "
                     "tokenizer's own library (default)")
    tok.add_argument("--verify-fraction", type=float, default=0.005,
                     help="fraction of documents a fast backend encodes that are re-encoded by the "
                     "tokenizer's own library; a difference stops the run (default 0.005)")
    tok.add_argument("--append-eod", action="store_true",
                     help="append the end-of-document token to every document")
    out = p.add_argument_group("output")
    out.add_argument("--output-prefix", required=True,
                     help="writes <prefix>_<key>_document.bin/.idx/.summary.json")
    out.add_argument("--shard-index", type=int, default=0,
                     help="this job's part (0-based) of the sorted input files; see --num-shards")
    out.add_argument("--num-shards", type=int, default=1,
                     help="split the input files into this many contiguous parts, one per job; "
                     "tools/merge_datasets.py joins the outputs in index order into what one job writes")
    out.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    out.add_argument("--chunk-mb", type=float, default=256.0,
                     help="split plain (uncompressed UTF-8) files larger than this into parallel "
                     "chunks")
    out.add_argument("--keep-shards", action="store_true",
                     help="keep the per-task shard files after the merge")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    return PreprocessOptions(
        output_prefix=a.output_prefix, tokenizer=a.tokenizer, inputs=a.input,
        json_keys=a.json_keys, append_eod=a.append_eod, workers=a.workers, strict=a.strict,
        max_docs=a.max_docs, chunk_mb=a.chunk_mb, hf_dataset=a.hf_dataset,
        hf_config=a.hf_config, hf_split=a.hf_split, keep_shards=a.keep_shards,
        progress=not a.no_progress, tokenizer_backend=a.tokenizer_backend,
        verify_fraction=a.verify_fraction, shard_index=a.shard_index, num_shards=a.num_shards)


def main(argv=None) -> int:
    opts = parse_args(argv)
    try:
        summaries = run_preprocess(opts)
    except DataError as err:
        print(f"preprocess_c4: error: {err}", file=sys.stderr)
        return 1
    for key, s in summaries.items():
        skipped = sum(v["count"] for v in s["skipped"].values())
        print(f"{s['output_prefix']}: {s['documents']:,} documents, {s['tokens']:,} tokens "
              f"({s['dtype']}), {skipped:,} lines skipped"
              f"{' ' + json.dumps({k: v['count'] for k, v in s['skipped'].items()}) if skipped else ''}"
              f", {s['docs_per_s']:,.0f} docs/s, {s['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
