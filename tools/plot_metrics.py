#!/usr/bin/env python
"""Plot run directories written by `python -m megatron_mixln.pretrain` (metrics.jsonl + config.json).

    python tools/plot_metrics.py runs/mix runs/pre --out plots/

writes into --out:
  loss.png                      training loss of every run (labels from each run's norm position)
  perplexity.png                validation perplexity of every run (log scale)
  grad_norms_<run>.png          per-layer gradient norms over steps, one panel per sublayer
  grad_norm_heatmap_<run>.png   the same as layers x steps heatmaps (log colour scale)
and prints each run's last validation perplexity. A resumed run may log a step twice; the last
record of a step wins.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_mixln.training.metrics import read_metrics  # noqa: E402

NAMES = {"pre": "Pre-LN", "post": "Post-LN", "mix": "Mix-LN", "peri": "Peri-LN", "lns": "LNS",
         "deepnorm": "DeepNorm", "deeppost": "DeepPost"}
GRAD_KEY = re.compile(r"^grad_norm/layer_(\d+)/(\w+)$")
SUBLAYER_ORDER = ("attn", "mlp", "attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm")


def load_run(run_dir: str) -> dict:
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise SystemExit(f"error: {run_dir}: no metrics.jsonl (expected a run directory of megatron_mixln.pretrain)")
    try:
        by_kind = read_metrics(metrics_path)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    config = {}
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as fh:
            config = json.load(fh)
    return {"dir": run_dir, "config": config, "label": run_label(config, run_dir),
            **{k: by_kind[k] for k in ("train", "valid", "grad_norms")}}


def run_label(config: dict, run_dir: str) -> str:
    model = config.get("model", {})
    position = model.get("norm_position")
    if not position:
        return os.path.basename(os.path.normpath(run_dir))
    label = NAMES.get(position, position)
    if position == "mix":
        first = config.get("positions", "").split(",")[0]  # "post*3", "post", or "pre*N" when k = 0
        if first.startswith("post*"):
            k = first.split("*")[1]
        else:
            k = "1" if first == "post" else "0" if first.startswith("pre") else "?"
        label += f" (k={k})"
    return label


def _unique_labels(runs: list[dict]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        seen[run["label"]] = seen.get(run["label"], 0) + 1
    for run in runs:
        if seen[run["label"]] > 1:
            run["label"] += f" [{os.path.basename(os.path.normpath(run['dir']))}]"


def grad_norm_table(run: dict) -> tuple[list[int], dict[str, dict[int, list[float]]]]:
    """-> steps, {sublayer: {layer: [norm per step]}}."""
    steps = [r["step"] for r in run["grad_norms"]]
    table: dict[str, dict[int, list[float]]] = {}
    for i, rec in enumerate(run["grad_norms"]):
        for key, value in rec.items():
            m = GRAD_KEY.match(key)
            if m:
                col = table.setdefault(m[2], {}).setdefault(int(m[1]), [math.nan] * len(steps))
                col[i] = value
    order = {name: i for i, name in enumerate(SUBLAYER_ORDER)}
    return steps, dict(sorted(table.items(), key=lambda kv: order.get(kv[0], 99)))


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def plot(runs: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    os.makedirs(out_dir, exist_ok=True)
    written = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ax.plot([r["step"] for r in run["train"]], [r["loss"] for r in run["train"]], label=run["label"])
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax.grid(alpha=0.3), ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if run["valid"]:
            ax.plot([r["step"] for r in run["valid"]], [r["valid_ppl"] for r in run["valid"]], marker="o",
                    label=run["label"])
    ax.set(xlabel="step", ylabel="validation perplexity", title="Validation perplexity", yscale="log")
    ax.grid(alpha=0.3, which="both"), ax.legend()
    save(fig, "perplexity.png")

    for run in runs:
        steps, table = grad_norm_table(run)
        if not steps:
            continue
        name = _safe_name(run["label"])
        cmap = plt.get_cmap("viridis")
        fig, axes = plt.subplots(1, len(table), figsize=(4.2 * len(table), 3.8), squeeze=False)
        for ax, (sub, layers) in zip(axes[0], table.items()):
            n = len(layers)
            for j, (layer, values) in enumerate(sorted(layers.items())):
                ax.plot(steps, values, color=cmap(j / max(n - 1, 1)), label=f"layer {layer}")
            ax.set(title=sub, xlabel="step", yscale="log")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("gradient norm")
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.suptitle(f"Per-layer gradient norms: {run['label']}")
        save(fig, f"grad_norms_{name}.png")

        fig, axes = plt.subplots(1, len(table), figsize=(4.2 * len(table), 3.8), squeeze=False)
        for ax, (sub, layers) in zip(axes[0], table.items()):
            grid = [layers[layer] for layer in sorted(layers)]
            positive = [v for row in grid for v in row if v and v > 0 and math.isfinite(v)]
            norm = LogNorm(vmin=min(positive), vmax=max(positive)) if positive else None
            im = ax.imshow(grid, aspect="auto", origin="lower", norm=norm, cmap="magma",
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, 0.5, len(grid) + 0.5))
            ax.set(title=sub, xlabel="step", ylabel="layer")
            ax.set_yticks(range(1, len(grid) + 1, max(1, len(grid) // 12)))
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"Per-layer gradient norms (layers x steps): {run['label']}")
        save(fig, f"grad_norm_heatmap_{name}.png")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    args = p.parse_args(argv)
    runs = [load_run(d) for d in args.run_dirs]
    _unique_labels(runs)
    written = plot(runs, args.out)
    for run in runs:
        last = run["valid"][-1] if run["valid"] else None
        ppl = f"{last['valid_ppl']:.3f} at step {last['step']}" if last else "no evaluation"
        print(f"{run['label']:<24s} validation perplexity {ppl}  ({run['dir']})")
    print(f"wrote {len(written)} plots to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
