#!/usr/bin/env python
"""The Mix-LN paper's layer diagnostics on a trained checkpoint (MIXLN.md §6).

    python tools/analyze_layers.py --checkpoint runs/71m-mix --data-path data/c4_valid_text_document \
        --seq-length 256 --num-samples 256 --out runs/71m-mix/layers

--checkpoint takes a training --save directory (DeepSpeed, any TP/PP layout; `latest` or --tag) or
a plain directory from tools/convert_checkpoint.py. Writes layer_analysis.json, angular_distance.png
(heatmap over layer l and distance n) and layer_removal.png, and prints both tables.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="training --save dir (DeepSpeed) or plain converted dir")
    p.add_argument("--tag", help="checkpoint tag (default: the one in 'latest')")
    p.add_argument("--data-path", required=True, help="indexed dataset prefix (e.g. C4 validation)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=128, help="samples of seq-length+1 tokens")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--skip-removal", action="store_true", help="angular distance only (removal costs L+1 passes)")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    for flag in ("seq_length", "num_samples", "micro_batch_size"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')}: must be positive")
    if not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint: {args.checkpoint} is not a directory")
    return args


def load_model(path: str, tag: str | None):
    from megatron_mixln.model import build_model
    from megatron_mixln.parallel.checkpoint_convert import read_checkpoint

    state_dict, config = read_checkpoint(path, tag)
    if config is None:
        raise ValueError(f"{path}: the checkpoint records no model config")
    model = build_model(config, device="meta")
    model.to_empty(device="cpu")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()


def batches(args):
    from megatron_mixln.data import build_train_valid_test_datasets

    data, _, _ = build_train_valid_test_datasets(
        [args.data_path], "1,0,0", args.seq_length, args.seed, (args.num_samples, 0, 0), None)
    tokens = np.stack([data[i]["tokens"] for i in range(args.num_samples)])
    return [torch.from_numpy(tokens[i:i + args.micro_batch_size])
            for i in range(0, args.num_samples, args.micro_batch_size)]


def plot(result: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.array(result["angular_distance"], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(d[:, 1:], origin="lower", aspect="auto", cmap="viridis")
    ax.set_xlabel("n (layers apart)")
    ax.set_ylabel("l (0 = embedding output)")
    ax.set_xticks(range(d.shape[0] - 1), [str(n) for n in range(1, d.shape[0])])
    ax.set_title("angular distance d(h_l, h_{l+n})")
    fig.colorbar(im)
    fig.savefig(os.path.join(out, "angular_distance.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)
    if result.get("layer_removal"):
        rows = result["layer_removal"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        colors = ["tab:orange" if r["position"] in ("post", "deepnorm", "deeppost") else "tab:blue" for r in rows]
        ax.bar([r["layer"] for r in rows], [r["drop"] for r in rows], color=colors)
        ax.set_xlabel("removed layer (orange: post-like, blue: other)")
        ax.set_ylabel("perplexity increase")
        ax.set_title(f"layer removal (full model perplexity {result['perplexity']:.2f})")
        fig.savefig(os.path.join(out, "layer_removal.png"), dpi=120, bbox_inches="tight")
        plt.close(fig)


def main(argv=None) -> int:
    from megatron_mixln.data.fileio import atomic_write_json
    from megatron_mixln.diagnostics import angular_distances, layer_removal_drop, perplexity

    args = parse_args(argv)
    try:
        model = load_model(args.checkpoint, args.tag)
        data = batches(args)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"analyze_layers: {e}", file=sys.stderr)
        return 2
    d = angular_distances(model, data)
    result = {
        "checkpoint": args.checkpoint,
        "positions": [b.position for b in model.layers],
        "angular_distance": [[None if math.isnan(v) else v for v in row] for row in d.tolist()],
        "perplexity": perplexity(model, data),
        "layer_removal": None if args.skip_removal else layer_removal_drop(model, data),
    }
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "layer_analysis.json"), result)
    plot(result, args.out)
    print(f"perplexity of the full model: {result['perplexity']:.3f}")
    print("angular distance to the next layer (n = 1):")
    for l in range(len(model.layers)):
        print(f"  h_{l} -> h_{l + 1} ({model.layers[l].position:<8}) {d[l, 1].item():.4f}")
    for row in result["layer_removal"] or []:
        print(f"  without layer {row['layer']:>2} ({row['position']:<8}) perplexity {row['perplexity']:.3f} "
              f"(+{row['drop']:.3f})")
    print(f"wrote {args.out}/layer_analysis.json and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
