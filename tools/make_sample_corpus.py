#!/usr/bin/env python
"""Write a C4-format sample corpus: the fixed corpus shipped with the project (no network).

    python tools/make_sample_corpus.py --output-dir data/sample_c4 --target-mb 8

gives data/sample_c4/c4-train.0000i-of-0000N.json.gz and c4-validation.0000j-of-0000M.json.gz,
one {"text", "timestamp", "url"} object per line -- the same layout as allenai/c4 -- the same bytes
on every machine (the first --target-mb MB of megatron_mixln/data/sample_corpus.jsonl.gz: docstrings
of the Python standard library and of a few pinned dependencies, 8 MB in all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_mixln.data.sample_corpus import SHIPPED_MB, CorpusOptions, make_sample_corpus  # noqa: E402
from megatron_mixln.errors import ArgumentParser, run_tool  # noqa: E402


def main(argv=None) -> int:
    return run_tool(_main, "make_sample_corpus", argv, bad_input=(ValueError, OSError))


def _main(argv) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--target-mb", type=float, default=4.0,
                   help=f"text size to take, in MB (default 4; at most {SHIPPED_MB:g}, all that is shipped)")
    p.add_argument("--train-shards", type=int, default=4)
    p.add_argument("--valid-shards", type=int, default=1)
    p.add_argument("--valid-percent", type=float, default=2.0,
                   help="share of documents that go to the validation split")
    p.add_argument("--min-chars", type=int, default=200, help="skip shorter docstrings")
    a = p.parse_args(argv)
    result = make_sample_corpus(CorpusOptions(
        output_dir=a.output_dir, target_mb=a.target_mb, train_shards=a.train_shards,
        valid_shards=a.valid_shards, valid_percent=a.valid_percent, min_chars=a.min_chars))
    print(json.dumps(result, indent=1))
    if result["mb"] < a.target_mb:
        print(f"note: only {result['mb']} MB are shipped; wrote all of it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
