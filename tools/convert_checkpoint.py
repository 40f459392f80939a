#!/usr/bin/env python
"""Convert a checkpoint between parallel layouts (logic: megatron_mixln/checkpoint/convert.py).

  # a DeepSpeed TP=2 x PP=2 run -> one plain state dict (model.safetensors + config.json)
  python tools/convert_checkpoint.py --input runs/x/ckpt --output runs/x/plain --to plain
  # plain -> DeepSpeed layout for TP=1, PP=1 (plain engine) or TP=2 x PP=2 (pipeline engine)
  python tools/convert_checkpoint.py --input runs/x/plain --output runs/y/ckpt --to deepspeed --tp 1 --pp 1
  python tools/convert_checkpoint.py --input runs/x/ckpt --output runs/y/ckpt --to deepspeed --tp 2 --pp 2

Then resume with engine.load_checkpoint(dir, load_optimizer_states=False): weights, step counters,
LR scheduler and client state carry over; optimizer moments restart (they are not converted).

  # a ZeRO-1/2 checkpoint (PP=1) -> DeepSpeed's universal form, optimizer states kept: the trainer
  # resumes it (--load runs/y/ckpt) at any data-parallel size, TP size and ZeRO stage 1-2
  python tools/convert_checkpoint.py --input runs/x/ckpt --output runs/y/ckpt --to universal

  # a LayerNorm Pre-LN model (pre/lns layers) -> the RMSNorm model with the same outputs (arXiv 2305.14858;
  # LayerNorm biases folded into linear biases), in the plain format; --to deepspeed lays it out for a run
  python tools/convert_checkpoint.py --input runs/x/ckpt --output runs/x/rmsnorm --to rmsnorm
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_mixln.errors import ArgumentParser, UsageError, run_tool


def main(argv=None) -> int:
    return run_tool(_main, "convert_checkpoint", argv, bad_input=(ValueError, OSError, RuntimeError))


def _main(argv) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    p.add_argument("--input", required=True, help="plain dir (model.safetensors) or DeepSpeed checkpoint dir")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--to", choices=("plain", "deepspeed", "universal", "rmsnorm"), default="plain")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=None,
                   help="TP size of the --to deepspeed output (default 1)")
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=None,
                   help="PP size of the --to deepspeed output (default 1)")
    p.add_argument("--engine", choices=("plain", "pipeline"), default=None,
                   help="DeepSpeed engine the output is for (default: pipeline if --pp > 1 else plain)")
    p.add_argument("--tag", default=None, help="input DeepSpeed tag (default: the 'latest' file)")
    p.add_argument("--out-tag", default=None, help="output DeepSpeed tag (default: the input tag)")
    p.add_argument("--config", default=None, help="ModelConfig JSON, when the input carries none")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output (written whole, then swapped in)")
    p.add_argument("--dp", type=int, default=None,
                   help="data-parallel size recorded in the --to deepspeed output's metadata (default 1)")
    args = p.parse_args(argv)
    # Layout options describe a DeepSpeed output: elsewhere they would be ignored while the summary echoed them
    given = [(f, v) for f, v in (("--tp", args.tp), ("--pp", args.pp), ("--engine", args.engine), ("--dp", args.dp),
                                 ("--out-tag", args.out_tag)) if v is not None]
    if args.to == "universal":
        given = [(f, v) for f, v in given if f != "--out-tag"]  # a universal checkpoint gets a tag too
    if given and args.to != "deepspeed":
        names = "/".join(f for f, _ in given)
        then = "" if args.to == "universal" else (
            "; convert, then lay the result out with --to deepspeed " + " ".join(f"{f} {v}" for f, v in given))
        raise UsageError(f"{names}: only for --to deepspeed, not --to {args.to}{then}")
    args.tp, args.pp, args.dp = args.tp or 1, args.pp or 1, args.dp or 1
    if not os.path.isdir(args.input):
        raise UsageError(f"--input {args.input}: no such directory (expected a --save directory or a plain checkpoint)")
    src, dst = os.path.realpath(args.input), os.path.realpath(args.output)
    if dst == src or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise UsageError(f"--output {args.output}: is --input {args.input} or overlaps it; write the conversion to a "
                         "new directory (the source run stays as it is)")
    from megatron_mixln.fileio import check_output, staged_directory

    check_output(args.output, args.overwrite)  # ValueError: run_tool's one-line error, exit 2

    from megatron_mixln.model import ModelConfig
    from megatron_mixln.checkpoint.convert import convert

    config = None
    try:
        if args.config:
            with open(args.config) as f:
                config = ModelConfig(**json.load(f))
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"--config {args.config}: {exc}") from None
    with staged_directory(args.output) as out:  # a kill or an error leaves --output as it was
        if args.to == "universal":
            from megatron_mixln.checkpoint.universal import convert_to_universal

            summary = convert_to_universal(args.input, out, tag=args.tag, out_tag=args.out_tag)
        else:
            summary = convert(args.input, out, to=args.to, tp=args.tp, pp=args.pp, engine=args.engine,
                              tag=args.tag, out_tag=args.out_tag, config=config, dp=args.dp)
    if "dir" in summary["target"]:  # written under the staging name: report where it now is
        summary["target"]["dir"] = os.path.abspath(args.output)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
