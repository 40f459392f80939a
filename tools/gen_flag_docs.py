#!/usr/bin/env python
"""Write docs/flags.md from the config dataclasses (ModelConfig, TrainingConfig), or check it is current.

    python tools/gen_flag_docs.py            # rewrite docs/flags.md
    python tools/gen_flag_docs.py --check    # exit 1 (and say so) when docs/flags.md is stale
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_mixln.training.flag_docs import REGENERATE, render

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "flags.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the page is stale")
    parser.add_argument("--output", default=PAGE, help="the page to write or check (default: docs/flags.md)")
    args = parser.parse_args(argv)
    text = render() + "\n"
    if args.check:
        current = open(args.output, encoding="utf-8").read() if os.path.isfile(args.output) else None
        if current != text:
            print(f"error: {args.output} is stale (the config dataclasses changed); regenerate it: {REGENERATE}",
                  file=sys.stderr)
            return 1
        return 0
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
