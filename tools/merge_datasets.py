#!/usr/bin/env python
"""Merge Megatron indexed datasets (``.bin/.idx`` prefixes) in the given order into one, e.g. the
parts that ``preprocess_c4.py --shard-index i --num-shards n`` wrote on n nodes:

    python tools/merge_datasets.py --input data/c4_part00000_text_document data/c4_part00001_text_document \\
        --output-prefix data/c4_text_document

The result is byte for byte what one ``preprocess_c4.py`` run over all the files writes. Memory stays
flat (the .bin is copied in blocks, the index streamed); the output is written under temporary names
and renamed; a ``<output>.summary.json`` sums the parts' summaries. Parts with another dtype,
tokenizer or --append-eod are refused, naming the file, before anything is written.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_mixln.data.errors import DataError  # noqa: E402
from megatron_mixln.data.multinode import merge_preprocessed  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX",
                   help="dataset prefixes (without .bin/.idx), merged in this order; a glob expands sorted")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx/.summary.json")
    a = p.parse_args(argv)
    prefixes = []
    for item in a.input:
        prefixes += sorted(m[:-4] for m in glob.glob(item + ".idx")) if glob.has_magic(item) else [item]
    try:
        summary = merge_preprocessed(prefixes, a.output_prefix)
    except DataError as err:
        print(f"merge_datasets: error: {err}", file=sys.stderr)
        return 1
    print(f"{summary['output_prefix']}: {summary['documents']:,} documents, {summary['tokens']:,} tokens "
          f"({summary['dtype']}) from {len(prefixes)} parts, {summary['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
