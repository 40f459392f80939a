#!/usr/bin/env python
"""Import a Hugging Face LLaMA directory as a checkpoint `pretrain --load` accepts (logic: megatron_mixln/hf/hf_import.py).

  python tools/convert_from_hf.py --hf path/to/llama --output runs/cont/ckpt            # stock LLaMA: all pre
  python tools/convert_from_hf.py --hf mixln_ref_71m --output runs/ref/ckpt \
      --norm-position mix --post-ln-layers 3      # a Mix-LN reference-code model (NORM_TYPE=post_pre POST_NUM=3)

Then continue pretraining with the same model flags plus `--load runs/cont/ckpt` (iteration 0 unless
--iteration; optimizer moments start fresh). The model flags the run needs are printed (model_config).
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_mixln.errors import ArgumentParser, run_tool


def main(argv=None) -> int:
    return run_tool(_main, "convert_from_hf", argv, bad_input=(ValueError, OSError, RuntimeError))


def _main(argv) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors or pytorch_model.bin)")
    p.add_argument("--output", required=True, help="checkpoint directory to create (use as --load)")
    p.add_argument("--norm-position", default=None,
                   help="per-layer positions of a model whose config.json does not record them (e.g. 'mix', 'post*3,pre*9')")
    p.add_argument("--post-ln-layers", type=int, default=None, help="with --norm-position mix: k leading post layers")
    p.add_argument("--iteration", type=int, default=0, help="iteration counter of the checkpoint (default 0)")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234, help="seeds the resumed run's RNGs")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    args = p.parse_args(argv)

    from megatron_mixln.hf.hf_import import import_from_hf

    summary = import_from_hf(args.hf, args.output, args.norm_position, args.post_ln_layers, args.iteration,
                             args.tp, args.pp, args.seed, args.overwrite)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
