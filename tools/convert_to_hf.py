#!/usr/bin/env python
"""Export a training checkpoint to a Hugging Face transformers directory (logic: megatron_mixln/hf/export.py).

  python tools/convert_to_hf.py --checkpoint runs/71m-mix/ckpt --output hf/71m-mix [--tag iter_0010000] \
      [--dtype fp32|bf16|fp16] [--max-shard-size 5GB] [--tokenizer spm.model] [--always-custom | --stock] [--overwrite]

--checkpoint: a training --save directory (DeepSpeed, any TP/PP layout, ZeRO 0-3; `latest` or --tag) or a
plain directory from tools/convert_checkpoint.py. The tokenizer defaults to the run's --tokenizer.
All-pre RMSNorm models become stock LlamaForCausalLM; every other schedule ships its own
configuration/modeling files (load with trust_remote_code=True).
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_mixln.errors import ArgumentParser, UsageError, run_tool


def main(argv=None) -> int:
    return run_tool(_main, "convert_to_hf", argv, bad_input=(ValueError, OSError, RuntimeError))


def _main(argv) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="training --save dir or plain converted dir")
    p.add_argument("--output", required=True, help="HF model directory to create")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one in 'latest')")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: as stored")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 5GB, 200MB)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model or tokenizer.json (default: the run's)")
    p.add_argument("--config", default=None, help="ModelConfig JSON, when the checkpoint records none")
    p.add_argument("--always-custom", action="store_true", help="custom code even for an all-pre RMSNorm model")
    p.add_argument("--stock", action="store_true",
                   help="require a stock transformers class (no remote code); refused when none computes the model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    args = p.parse_args(argv)

    from megatron_mixln.hf.export import export_to_hf
    from megatron_mixln.hf.source_hint import checkpoint_directory_hint

    hint = checkpoint_directory_hint(args.checkpoint)
    if hint:
        raise UsageError(hint)
    summary = export_to_hf(args.checkpoint, args.output, args.tag, args.dtype, args.max_shard_size,
                           args.tokenizer, args.always_custom, args.overwrite, args.config, stock=args.stock)
    if summary.get("note"):
        print(f"convert_to_hf: note: {summary['note']}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
