"""Figure conventions shared by tools/plot_metrics.py and the sweep report: readable log ticks, integer
layer ticks, one colour scale per metric across the runs of a figure, and the per-layer profile figure
that overlays runs (gradient norms and the --diagnostics-interval metrics)."""
from __future__ import annotations

import math
import re

import numpy as np

# Per-layer metrics a profile/heatmap can show: metric-key prefix -> (title, log scale).
LAYER_METRICS = {
    "grad_norm": ("gradient norm", True),
    "act_rms_out": ("residual RMS leaving the layer", True),
    "act_max_over_median": ("max |act| / median |act|", True),
    "act_kurtosis": ("feature kurtosis of the output", True),
    "attn_logit_max": ("max attention logit (over heads)", False),
    "attn_entropy": ("attention entropy (mean over heads, nats)", False),
    "update_ratio": ("update / weight  ||Δw|| / ||w||", True),
    "weight_norm": ("weight norm ||w||", True),
}
_LAYER_KEY = re.compile(r"^(\w+)/layer_(\d+)(?:/(\w+))?$")


def layer_values(record: dict, metric: str) -> dict[int, float]:
    """One metrics record -> {layer: value} of `metric`. grad_norm: sqrt of the sum of the sublayers'
    squares (the whole layer's norm); the others: their per-layer key ("attn_logit_max/layer_03")."""
    out: dict[int, float] = {}
    for key, value in record.items():
        m = _LAYER_KEY.match(key)
        if not m or m[1] != metric or value is None:
            continue
        layer = int(m[2])
        if metric == "grad_norm":
            out[layer] = math.sqrt(out.get(layer, 0.0) ** 2 + float(value) ** 2)
        elif m[3] is None:
            out[layer] = float(value)
    return dict(sorted(out.items()))


def readable_log_axis(ax, axis: str = "y") -> None:
    """Plain-number ticks on a log axis that always include some inside the data range: 1-2-5 steps
    over wide ranges, evenly spaced round numbers when the range spans less than a factor of 20 (a
    perplexity axis from 150 to 190 gets 150, 160, ... instead of no tick at all)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    target = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if not (lo > 0 and hi > lo and math.isfinite(hi)):
        return
    if hi / lo < 20:
        ticks = [t for t in MaxNLocator(nbins=6).tick_values(lo, hi) if lo <= t <= hi and t > 0]
        target.set_major_locator(FixedLocator(ticks))
    else:
        target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def integer_axis(ax, axis: str = "x") -> None:
    """Whole-number ticks only (layers, steps)."""
    from matplotlib.ticker import MaxNLocator

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True, nbins=12))


def shared_range(arrays, log: bool) -> tuple[float, float] | None:
    """(vmin, vmax) over every finite (and, for a log scale, positive) value of all arrays: the one colour
    scale of a metric across the runs of a figure; None when there is no such value."""
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays]) if arrays else np.array([])
    values = values[np.isfinite(values)]
    if log:
        values = values[values > 0]
    if values.size == 0:
        return None
    lo, hi = float(values.min()), float(values.max())
    return (lo, hi) if hi > lo else (lo * 0.9 if log else lo - 0.5, hi * 1.1 if log else hi + 0.5)


def color_norm(vrange, log: bool):
    from matplotlib.colors import LogNorm, Normalize

    if vrange is None:
        return None
    return LogNorm(*vrange) if log else Normalize(*vrange)


def nearest_record(records: list[dict], step: int) -> dict | None:
    """The record whose step is closest to `step` (ties: the earlier one)."""
    return min(records, key=lambda r: (abs(r["step"] - step), r["step"])) if records else None


def profile_figure(runs: list[tuple[str, dict[str, list[dict]]]], steps: list[int], metrics: list[str]):
    """Per-layer profiles overlaying every run: one row per metric and one column per step (each run's
    record nearest to that step); a single step lays the metrics out in a grid of up to 4 columns.
    runs: [(label, {metric: [records by step]})]. The legend goes below the panels. Returns the
    figure, or None when no run has any of the metrics."""
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(layer_values(r, m) for _, by in runs for r in by.get(m, []))]
    if not metrics or not steps:
        return None
    if len(steps) == 1:
        ncols = min(4, len(metrics))
        nrows = -(-len(metrics) // ncols)
        cells = [(m, steps[0], divmod(i, ncols)) for i, m in enumerate(metrics)]
    else:
        nrows, ncols = len(metrics), len(steps)
        cells = [(m, st, (i, j)) for i, m in enumerate(metrics) for j, st in enumerate(steps)]
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 2.8 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("tab10")
    used = set()
    for metric, step, (i, j) in cells:
        ax = axes[i][j]
        used.add((i, j))
        title, log = LAYER_METRICS.get(metric, (metric, False))
        for k, (label, by_metric) in enumerate(runs):
            rec = nearest_record(by_metric.get(metric, []), step)
            vals = layer_values(rec, metric) if rec else {}
            if vals:
                ax.plot(list(vals), list(vals.values()), marker="o", ms=3, color=cmap(k % 10),
                        label=f"{label} (step {rec['step']})" if len(steps) == 1 else label)
        if log and ax.has_data():
            ax.set_yscale("log")
            readable_log_axis(ax, "y")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        integer_axis(ax, "x")
        ax.grid(alpha=0.3)
        ax.set_xlabel("layer", fontsize=8)
        if len(steps) == 1:
            ax.set_title(title, fontsize=9)
        else:
            if i == 0:
                ax.set_title(f"step {step}")
            if j == 0:
                ax.set_ylabel(title, fontsize=8)
    for i in range(nrows):
        for j in range(ncols):
            if (i, j) not in used:
                axes[i][j].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(handles)), fontsize=8)
    return fig
