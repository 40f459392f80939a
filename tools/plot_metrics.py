#!/usr/bin/env python
"""Plot run directories written by `python -m megatron_mixln.pretrain` (metrics.jsonl + config.json).

    python tools/plot_metrics.py runs/mix runs/pre --out plots/

writes into --out:
  loss.png                      training loss of every run (labels from each run's norm position)
  perplexity.png                validation perplexity of every run (log scale)
  grad_norms_<run>.png          per-layer gradient norms over steps, one panel per sublayer
  grad_norm_heatmap_<run>.png   the same as layers x steps heatmaps (log colour scale)
  diagnostics_heatmap_<run>.png layers x steps heatmaps of the --diagnostics-interval metrics
  layer_profiles.png            per-layer profiles of every run overlaid, at --profile-steps
Each heatmap metric has ONE colour scale across all the runs plotted, so runs compare by eye.
Prints each run's last validation perplexity. A resumed run may log a step twice; the last record
of a step wins.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_mixln.research.plot_style import (  # noqa: E402
    LAYER_METRICS, color_norm, integer_axis, layer_values, profile_figure, readable_log_axis, shared_range,
)
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
            **{k: by_kind[k] for k in ("train", "valid", "grad_norms", "diagnostics")}}


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


DIAGNOSTIC_HEATMAPS = ("act_rms_out", "act_max_over_median", "act_kurtosis", "attn_logit_max", "attn_entropy",
                       "update_ratio")


def _heatmap(fig, ax, grid, steps, norm, title, label):
    """A layers x steps heatmap with its colour bar beside it (constrained layout keeps the bar's labels
    clear of the next panel) and whole-number layer ticks."""
    first, last = (steps[0], steps[-1]) if len(steps) > 1 else (steps[0] - 1, steps[0] + 1)
    im = ax.imshow(grid, aspect="auto", origin="lower", norm=norm, cmap="magma",
                   extent=(first - 0.5, last + 0.5, 0.5, len(grid) + 0.5), interpolation="nearest")
    ax.set(title=title, xlabel="step", ylabel="layer")
    integer_axis(ax, "y")
    integer_axis(ax, "x")
    bar = fig.colorbar(im, ax=ax, label=label, shrink=0.9)
    if norm is not None and norm.__class__.__name__ == "LogNorm":
        readable_log_axis(bar.ax, "y")


def _layer_grid(records, metric):
    """{layer: [value per record]} -> list of rows (layers 1..L) for imshow."""
    cols = [layer_values(r, metric) for r in records]
    layers = sorted({l for c in cols for l in c})
    return [[c.get(l, math.nan) for c in cols] for l in layers]


def plot(runs: list[dict], out_dir: str, profile_steps: list[int] | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    integer_axis(ax, "x")
    ax.grid(alpha=0.3), ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if run["valid"]:
            ax.plot([r["step"] for r in run["valid"]], [r["valid_ppl"] for r in run["valid"]], marker="o",
                    label=run["label"])
    ax.set(xlabel="step", ylabel="validation perplexity", title="Validation perplexity", yscale="log")
    readable_log_axis(ax, "y")
    integer_axis(ax, "x")
    ax.grid(alpha=0.3, which="both"), ax.legend()
    save(fig, "perplexity.png")

    tables = {id(run): grad_norm_table(run) for run in runs}
    # one colour scale per sublayer across every run
    grad_range = {}
    for steps, table in tables.values():
        for sub, layers in table.items():
            grad_range.setdefault(sub, []).extend(list(v) for v in layers.values())
    grad_range = {sub: shared_range(rows, log=True) for sub, rows in grad_range.items()}
    diag_range = {m: shared_range([v for run in runs for v in map(list, _layer_grid(run["diagnostics"], m))],
                                  LAYER_METRICS[m][1]) for m in DIAGNOSTIC_HEATMAPS}
    for run in runs:
        steps, table = tables[id(run)]
        name = _safe_name(run["label"])
        if steps:
            cmap = plt.get_cmap("viridis")
            fig, axes = plt.subplots(1, len(table), figsize=(4.2 * len(table), 3.8), squeeze=False,
                                     layout="constrained")
            for ax, (sub, layers) in zip(axes[0], table.items()):
                n = len(layers)
                for j, (layer, values) in enumerate(sorted(layers.items())):
                    ax.plot(steps, values, color=cmap(j / max(n - 1, 1)), label=f"layer {layer}")
                ax.set(title=sub, xlabel="step", yscale="log")
                readable_log_axis(ax, "y")
                integer_axis(ax, "x")
                ax.grid(alpha=0.3)
            axes[0][0].set_ylabel("gradient norm")
            axes[0][-1].legend(fontsize=7, loc="best")
            fig.suptitle(f"Per-layer gradient norms: {run['label']}")
            save(fig, f"grad_norms_{name}.png")

            fig, axes = plt.subplots(1, len(table), figsize=(4.4 * len(table), 3.8), squeeze=False,
                                     layout="constrained")
            for ax, (sub, layers) in zip(axes[0], table.items()):
                grid = [layers[layer] for layer in sorted(layers)]
                _heatmap(fig, ax, grid, steps, color_norm(grad_range.get(sub), True), sub, "gradient norm")
            fig.suptitle(f"Per-layer gradient norms (layers x steps, colour scale shared by all runs): {run['label']}")
            save(fig, f"grad_norm_heatmap_{name}.png")

        diag_steps = [r["step"] for r in run["diagnostics"]]
        present = [m for m in DIAGNOSTIC_HEATMAPS if any(layer_values(r, m) for r in run["diagnostics"])]
        if diag_steps and present:
            ncols = min(3, len(present))
            nrows = -(-len(present) // ncols)
            fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False,
                                     layout="constrained")
            for ax in axes.ravel()[len(present):]:
                ax.set_visible(False)
            for ax, metric in zip(axes.ravel(), present):
                title, log = LAYER_METRICS[metric]
                _heatmap(fig, ax, _layer_grid(run["diagnostics"], metric), diag_steps,
                         color_norm(diag_range[metric], log), metric, title)
            fig.suptitle(f"Instability diagnostics (layers x steps, colour scales shared by all runs): {run['label']}")
            save(fig, f"diagnostics_heatmap_{name}.png")

    profile_runs = [(run["label"], {"grad_norm": run["grad_norms"], **{m: run["diagnostics"] for m in LAYER_METRICS
                                                                       if m != "grad_norm"}}) for run in runs]
    steps = profile_steps or _default_profile_steps(runs)
    fig = profile_figure(profile_runs, steps, list(LAYER_METRICS))
    if fig is not None:
        fig.suptitle("Per-layer profiles of every run (each run's record nearest to the step)")
        save(fig, "layer_profiles.png")
    return written


def _default_profile_steps(runs: list[dict]) -> list[int]:
    """The first, middle and last step that has per-layer records in any run."""
    steps = sorted({r["step"] for run in runs for kind in ("grad_norms", "diagnostics") for r in run[kind]})
    if len(steps) <= 3:
        return steps
    return [steps[0], steps[len(steps) // 2], steps[-1]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--profile-steps", default=None,
                   help="comma-separated steps of layer_profiles.png (default: first, middle and last logged)")
    args = p.parse_args(argv)
    try:
        profile_steps = [int(s) for s in args.profile_steps.split(",")] if args.profile_steps else None
    except ValueError:
        p.error(f"--profile-steps {args.profile_steps!r}: expected comma-separated step numbers")
    runs = [load_run(d) for d in args.run_dirs]
    _unique_labels(runs)
    written = plot(runs, args.out, profile_steps)
    for run in runs:
        last = run["valid"][-1] if run["valid"] else None
        ppl = f"{last['valid_ppl']:.3f} at step {last['step']}" if last else "no evaluation"
        print(f"{run['label']:<24s} validation perplexity {ppl}  ({run['dir']})")
    print(f"wrote {len(written)} plots to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
