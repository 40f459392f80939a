"""The sweep report's PNG figures (matplotlib, Agg), each written to a temp name and renamed.

curves.png                 training loss and validation perplexity of every run
grad_norm_profiles.png     per-layer gradient norm vs layer at several points of training, every setting
angular_distance.png       per setting: heatmap of d(h_l, h_{l+n}) over l and n (tools/analyze_layers.py)
layer_removal.png          per setting: perplexity increase when layer l is removed
alpha.png                  perplexity vs post-layer fraction (only for a fraction sweep)
lr_sensitivity.png         final loss vs peak learning rate per setting (only for an --lr-sweep)
diagnostics_profiles.png   the --diagnostics-interval metrics per layer, every setting overlaid at its
                           largest stable learning rate (--lr-sweep) or every setting's first seed
"""
from __future__ import annotations

import math
import os

import numpy as np

from megatron_mixln.research.collect import aggregate
from megatron_mixln.research.lr_sweep import lr_sensitivity
from megatron_mixln.research.plot_style import LAYER_METRICS, integer_axis, profile_figure, readable_log_axis

POST_LIKE = ("post", "deepnorm", "deeppost")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str, name: str, written: list) -> None:
    from megatron_mixln.fileio import atomic_open

    plt = _plt()
    path = os.path.join(out, name)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append(path)


def _colors(settings: list[str]) -> dict[str, tuple]:
    cmap = _plt().get_cmap("tab10")
    return {s: cmap(i % 10) for i, s in enumerate(settings)}


def _finite(values):
    return [v if v is not None and math.isfinite(v) else np.nan for v in values]


def write_figures(runs: list[dict], out: str) -> list[str]:
    plt = _plt()
    written: list[str] = []
    rows = aggregate(runs)
    settings = [r["setting"] for r in rows]
    color = _colors(settings)

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    labelled = set()
    for r in runs:
        label = None if r["setting"] in labelled else r["setting"]
        labelled.add(r["setting"])
        if r["train_curve"]:
            steps, loss = zip(*r["train_curve"])
            a.plot(steps, _finite(loss), color=color[r["setting"]], alpha=0.85, label=label)
        if r["valid_curve"]:
            steps, ppl = zip(*r["valid_curve"])
            b.plot(steps, _finite(ppl), color=color[r["setting"]], marker="o", ms=3, alpha=0.85, label=label)
    a.set(xlabel="step", ylabel="training loss", title="Training loss (one line per seed)")
    b.set(xlabel="step", ylabel="validation perplexity", title="Validation perplexity", yscale="log")
    readable_log_axis(b, "y")
    for ax in (a, b):
        integer_axis(ax, "x")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, out, "curves.png", written)

    profiles = {s: [r["grad_norm_profiles"] for r in runs if r["setting"] == s and r["grad_norm_profiles"]]
                for s in settings}
    n_points = max((len(p[0]) for p in profiles.values() if p), default=0)
    if n_points:
        fig, axes = plt.subplots(1, n_points, figsize=(4 * n_points, 3.6), squeeze=False)
        for j, ax in enumerate(axes[0]):
            step = None
            for s, per_seed in profiles.items():
                arrays = [p[j]["layers"] for p in per_seed if len(p) > j]
                if not arrays:
                    continue
                step = per_seed[0][j]["step"]
                mean = np.mean(np.array(arrays, dtype=float), axis=0)
                ax.plot(range(1, len(mean) + 1), mean, marker="o", ms=3, color=color[s], label=s)
            ax.set(title=f"step {step}", xlabel="layer", yscale="log")
            readable_log_axis(ax, "y")
            integer_axis(ax, "x")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("gradient norm of the layer")
        axes[0][-1].legend(fontsize=8)
        fig.suptitle("Per-layer gradient norms during training (mean over seeds)", y=1.03)
        _save(fig, out, "grad_norm_profiles.png", written)

    analyses = {}
    for s in settings:
        first = next((r for r in runs if r["setting"] == s and r.get("layer_analysis")), None)
        if first:
            analyses[s] = first["layer_analysis"]
    if analyses:
        n = len(analyses)
        grids = {s: np.array([[np.nan if v is None else v for v in row] for row in res["angular_distance"]],
                             dtype=float)[:, 1:] for s, res in analyses.items()}
        vmax = max(float(np.nanmax(g)) for g in grids.values()) if grids else 1.0
        fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 0.8, 3.4), squeeze=False)
        for ax, (s, d) in zip(axes[0], grids.items()):
            im = ax.imshow(d, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
            ax.set_xticks(range(d.shape[1]), [str(k) for k in range(1, d.shape[1] + 1)])
            ax.set(title=s, xlabel="n (layers apart)")
        axes[0][0].set_ylabel("l (0 = embedding output)")
        fig.colorbar(im, ax=list(axes[0]), label="arccos(cos)/π, last token")
        fig.suptitle("Angular distance d(h_l, h_{l+n}) (first seed)", y=1.03)
        _save(fig, out, "angular_distance.png", written)
        removal = {s: res["layer_removal"] for s, res in analyses.items() if res.get("layer_removal")}
        if removal:
            fig, axes = plt.subplots(1, len(removal), figsize=(3.6 * len(removal), 3.0), squeeze=False, sharey=True)
            for ax, (s, rows_) in zip(axes[0], removal.items()):
                ax.bar([r["layer"] for r in rows_], [r["drop"] for r in rows_],
                       color=["tab:orange" if r["position"] in POST_LIKE else "tab:blue" for r in rows_])
                ax.set(title=s, xlabel="removed layer")
                ax.grid(alpha=0.3, axis="y")
            axes[0][0].set_ylabel("perplexity increase")
            fig.suptitle("Layer removal (orange: post-like layers; first seed)", y=1.03)
            _save(fig, out, "layer_removal.png", written)

    alpha_rows = [r for r in rows if r["fraction"] is not None]
    by_lr = {}  # one line per learning rate of an --lr-sweep (a single line otherwise)
    for r in alpha_rows:
        by_lr.setdefault(r.get("lr"), []).append(r)
    if len({r["fraction"] for r in alpha_rows}) > 1:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for lr, group in by_lr.items():
            ok = [r for r in group if r["ppl_mean"] is not None]
            ax.errorbar([100 * r["fraction"] for r in ok], [r["ppl_mean"] for r in ok],
                        yerr=[r["ppl_std"] or 0.0 for r in ok], marker="o", capsize=3,
                        label=None if lr is None else f"η = {lr:g}")
        if len(by_lr) > 1:
            ax.legend(fontsize=8)
        for r in alpha_rows:
            if r["diverged"]:
                ax.annotate("diverged", (100 * r["fraction"], ax.get_ylim()[1]), ha="center", va="top", color="red")
        ax.set(xlabel="post-LN layers α (% of layers)", ylabel="validation perplexity",
               title="Mix-LN: perplexity vs post-layer fraction")
        ax.grid(alpha=0.3)
        _save(fig, out, "alpha.png", written)
    _lr_figures(runs, out, written)
    return written


def _lr_figures(runs: list[dict], out: str, written: list) -> None:
    """lr_sensitivity.png (an --lr-sweep) and diagnostics_profiles.png (runs with diagnostics)."""
    plt = _plt()
    rows = lr_sensitivity(runs)
    if rows:
        color = _colors([r["setting"] for r in rows])
        fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
        for r in rows:
            lrs = r["lrs"]
            losses = [r["final_loss"][lr] for lr in lrs]
            shown = [l if math.isfinite(l) else r["l0"] for l in losses]
            ax.plot(lrs, shown, marker="o", color=color[r["setting"]],
                    label=f"{r['setting']} (S = {r['sensitivity']:.3f})")
            bad = [(lr, r["l0"]) for lr, l in zip(lrs, losses) if not math.isfinite(l)]
            if bad:
                ax.plot(*zip(*bad), linestyle="none", marker="x", ms=9, color=color[r["setting"]])
        l0 = statistics_mean([r["l0"] for r in rows])
        ax.axhline(l0, color="gray", linestyle="--", linewidth=1, label=f"ℓ_0 (initialisation) {l0:.2f}")
        ax.set(xscale="log", xlabel="peak learning rate η", ylabel="final validation loss ℓ(η)",
               title="LR sensitivity (x: diverged, shown at ℓ_0)")
        readable_log_axis(ax, "x")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        _save(fig, out, "lr_sensitivity.png", written)
    # diagnostics per layer: at each setting's largest stable rate (LR sweep) or each setting's first seed
    if rows:
        chosen = [(f"{r['setting']} η={r['largest_stable_lr']:g}", r["largest_stable_run"]) for r in rows
                  if r["largest_stable_run"]]
    else:
        seen, chosen = set(), []
        for r in runs:
            if r["setting"] not in seen:
                seen.add(r["setting"])
                chosen.append((r["setting"], r["name"]))
    by_name = {r["name"]: r for r in runs}
    profiles = [(label, {m: [by_name[name]["diagnostics"]] for m in LAYER_METRICS})
                for label, name in chosen if by_name[name].get("diagnostics")]
    if profiles:
        step = max(p[1]["update_ratio"][0]["step"] for p in profiles)
        fig = profile_figure(profiles, [step], [m for m in LAYER_METRICS if m != "grad_norm"])
        if fig is not None:
            fig.suptitle("Instability diagnostics per layer (each run's last diagnostics step)")
            _save(fig, out, "diagnostics_profiles.png", written)


def statistics_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
