#!/usr/bin/env python
"""The Mix-LN paper's layer diagnostics on a trained checkpoint or any HF LLaMA model (docs/paper.md#diagnostics).

    python tools/analyze_layers.py --checkpoint runs/71m-mix --data-path data/c4_valid_text_document \
        --seq-length 256 --num-samples 256 --out runs/71m-mix/layers [--device cuda]
    python tools/analyze_layers.py --checkpoint hf/71m-mix --lm-eval-tasks arc_easy,piqa --out hf/71m-mix/layers

--checkpoint takes a training --save directory (DeepSpeed, any TP/PP layout; `latest` or --tag), a
plain directory from tools/convert_checkpoint.py, or a Hugging Face LLaMA directory (stock, an export
of this stack, or the Mix-LN reference layout with --norm-position). Writes layer_analysis.json,
angular_distance.png (heatmap over layer l and distance n) and layer_removal.png, and prints the tables.
--lm-eval-tasks adds the paper's own metric: lm-evaluation-harness scores of the full model and of the
model without each layer, and their change (without - full) per task and metric.
"""
from __future__ import annotations

import argparse
import json
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
    p.add_argument("--data-path", help="indexed dataset prefix (e.g. C4 validation); optional with --lm-eval-tasks")
    p.add_argument("--norm-position", help="HF dirs that do not record positions (Mix-LN reference layout)")
    p.add_argument("--post-ln-layers", type=int, help="with --norm-position mix")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--lm-eval-tasks", help="comma-separated lm-eval tasks: report the drop per removed layer")
    p.add_argument("--lm-eval-include", help="directory of extra lm-eval task YAML files")
    p.add_argument("--lm-eval-limit", type=float, help="documents per task (lm-eval --limit)")
    p.add_argument("--lm-eval-batch-size", type=int, default=8)
    p.add_argument("--tokenizer", help="tokenizer for --lm-eval-tasks on a training checkpoint (default: the run's)")
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
    if not args.data_path and not args.lm_eval_tasks:
        p.error("--data-path is required (unless only --lm-eval-tasks is asked for)")
    return args


def is_hf_dir(path: str) -> bool:
    """An HF model directory: a config.json with a model_type (plain checkpoints' config.json has none)."""
    import json

    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg) as f:
        try:
            return "model_type" in json.load(f)
        except ValueError:
            return False


def load_model(path: str, tag: str | None, norm_position: str | None = None, post_ln_layers: int | None = None):
    from megatron_mixln.model import build_model
    from megatron_mixln.checkpoint.reader import read_full_state_dict

    if is_hf_dir(path):
        from megatron_mixln.hf.hf_import import read_hf_model

        state_dict, config = read_hf_model(path, norm_position, post_ln_layers)
    else:
        state_dict, config, _, _ = read_full_state_dict(path, tag)
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


def lm_eval_drop(args) -> dict:
    """lm-eval scores without each layer, on the HF directory itself or on a temporary export of the checkpoint."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_mixln.hf.lm_eval_drop import lm_eval_layer_drop
    from megatron_mixln.hf.remote_code import remote_code_verdict

    tasks = [t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()]
    limit = args.lm_eval_limit
    limit = int(limit) if limit is not None and limit >= 1 else limit
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = args.checkpoint
        if not is_hf_dir(hf_dir):
            from megatron_mixln.hf.export import export_to_hf

            hf_dir = os.path.join(tmp, "hf")
            export_to_hf(args.checkpoint, hf_dir, args.tag, tokenizer=args.tokenizer, always_custom=False)
            if not os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json")):
                raise ValueError(f"{args.checkpoint}: --lm-eval-tasks needs a tokenizer (the run recorded none); "
                                 "pass --tokenizer")
        trust, why = remote_code_verdict(hf_dir)  # only this project's own exported modeling code runs
        if why:
            print(f"analyze_layers: {why}; loading stock transformers classes only", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=trust, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust)
        model = model.to(args.device).eval()
        return lm_eval_layer_drop(model, tokenizer, tasks, args.lm_eval_include, limit, args.lm_eval_batch_size)


def main(argv=None) -> int:
    from megatron_mixln.fileio import atomic_write_json
    from megatron_mixln.diagnostics import angular_distances, layer_removal_drop, perplexity

    args = parse_args(argv)
    try:
        model = load_model(args.checkpoint, args.tag, args.norm_position, args.post_ln_layers).to(args.device)
        data = [b.to(args.device) for b in batches(args)] if args.data_path else None
    except (OSError, ValueError, RuntimeError) as e:
        print(f"analyze_layers: {e}", file=sys.stderr)
        return 2
    result = {"checkpoint": args.checkpoint, "positions": [b.position for b in model.layers]}
    if data is not None:
        d = angular_distances(model, data)
        result.update({
            "angular_distance": [[None if math.isnan(v) else v for v in row] for row in d.tolist()],
            "perplexity": perplexity(model, data),
            "layer_removal": None if args.skip_removal else layer_removal_drop(model, data),
        })
    if args.lm_eval_tasks:
        del model
        try:
            result["lm_eval"] = lm_eval_drop(args)
        except (OSError, ValueError, KeyError) as e:
            print(f"analyze_layers: --lm-eval-tasks: {e}", file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "layer_analysis.json"), result)
    if data is None:
        print_lm_eval(result["lm_eval"])
        print(f"wrote {args.out}/layer_analysis.json")
        return 0
    plot(result, args.out)
    print(f"perplexity of the full model: {result['perplexity']:.3f}")
    print("angular distance to the next layer (n = 1):")
    for l, position in enumerate(result["positions"]):
        print(f"  h_{l} -> h_{l + 1} ({position:<8}) {d[l, 1].item():.4f}")
    for row in result["layer_removal"] or []:
        print(f"  without layer {row['layer']:>2} ({row['position']:<8}) perplexity {row['perplexity']:.3f} "
              f"(+{row['drop']:.3f})")
    if result.get("lm_eval"):
        print_lm_eval(result["lm_eval"])
    print(f"wrote {args.out}/layer_analysis.json and plots")
    return 0


def print_lm_eval(res: dict) -> None:
    print("lm-eval, full model: " + json.dumps(res["full"]))
    for row in res["layers"]:
        print(f"  without layer {row['layer']:>2} ({row['position']:<8}) change " + json.dumps(row["delta"]))


if __name__ == "__main__":
    sys.exit(main())
