"""Learning-rate sensitivity of each norm setting over an --lr-sweep (Wortsman et al. 2023,
"Small-scale proxies for large-scale Transformer training instabilities", arXiv 2309.14322):

    S = E_η[ min(ℓ(η), ℓ_0) − ℓ* ]

over the swept peak learning rates η, with ℓ(η) the run's final loss (the last validation loss; the
last logged training loss without evaluation; a non-finite or diverged run counts as ℓ_0), ℓ_0 the
loss at initialisation (the step-1 training loss when the run logged it, i.e. --log-interval 1, else
ln(vocab size), what a freshly initialised model predicts to within a few percent) and ℓ* the best
final loss over η. S is computed per seed and averaged over seeds. Low S: the setting trains well over
a wide range of rates; high S: it only trains in a narrow band (or diverges).
"""
from __future__ import annotations

import math
import statistics


def final_loss(run: dict) -> float:
    """ℓ(η) of one collected run: last validation loss, else last training loss; NaN when none is finite."""
    for value in (run.get("valid_loss"), (run.get("train_curve") or [[None, None]])[-1][1]):
        if value is not None:
            return float(value)
    return float("nan")


def initial_loss(run: dict) -> float:
    """ℓ_0: the loss logged for step 1 (before any update) when there is one, else ln(vocab size)."""
    curve = run.get("train_curve") or []
    if curve and curve[0][0] == 1 and curve[0][1] is not None and math.isfinite(curve[0][1]):
        return float(curve[0][1])
    return math.log(run["vocab_size"])


def is_stable(run: dict) -> bool:
    """Finished without diverging, with a finite final loss below the loss at initialisation."""
    loss = final_loss(run)
    return not run["diverged"] and math.isfinite(loss) and loss < initial_loss(run)


def sensitivity(losses: dict[float, float], l0: float) -> float:
    """Wortsman et al.'s S for one seed: {η: final loss} and ℓ_0 -> mean_η min(ℓ(η), ℓ_0) − min_η ℓ(η)
    (non-finite losses count as ℓ_0)."""
    capped = [min(l, l0) if math.isfinite(l) else l0 for l in losses.values()]
    return statistics.fmean(capped) - min(capped)


def lr_sensitivity(runs: list[dict]) -> list[dict]:
    """One row per norm setting (in first-seen order) of an LR sweep's collected runs: the swept rates,
    the final loss per rate (mean over seeds), ℓ_0, ℓ*, S (mean and sample std over seeds), the largest
    rate at which every seed is stable and the name of that rate's first-seed run."""
    by_setting: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("lr") is not None:
            by_setting.setdefault(r["base_setting"], []).append(r)
    rows = []
    for setting, group in by_setting.items():
        lrs = sorted({r["lr"] for r in group})
        seeds = sorted({r["seed"] for r in group})
        per_seed = []
        for seed in seeds:
            mine = {r["lr"]: r for r in group if r["seed"] == seed}
            if set(mine) != set(lrs):
                continue  # an incomplete seed: its S would cover fewer rates
            l0 = initial_loss(mine[lrs[0]])
            losses = {lr: (final_loss(mine[lr]) if not mine[lr]["diverged"] else float("nan")) for lr in lrs}
            per_seed.append({"seed": seed, "l0": l0, "losses": losses, "S": sensitivity(losses, l0)})
        stable = [lr for lr in lrs if all(is_stable(r) for r in group if r["lr"] == lr)]
        best = max(stable) if stable else None
        first = next((r["name"] for r in sorted(group, key=lambda r: r["seed"]) if r["lr"] == best), None)
        mean_loss = {lr: _mean([s["losses"][lr] for s in per_seed]) for lr in lrs}
        values = [s["S"] for s in per_seed]
        rows.append({
            "setting": setting, "lrs": lrs, "seeds": [s["seed"] for s in per_seed],
            "final_loss": mean_loss, "l0": _mean([s["l0"] for s in per_seed]),
            "l_star": _mean([min(min(s["losses"][lr], s["l0"]) if math.isfinite(s["losses"][lr]) else s["l0"]
                                 for lr in lrs) for s in per_seed]),
            "sensitivity": _mean(values), "sensitivity_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": per_seed, "largest_stable_lr": best, "largest_stable_run": first,
        })
    return rows


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")


def render_lr_section(rows: list[dict]) -> list[str]:
    """The report.md section of an LR sweep."""
    if not rows:
        return []
    lrs = sorted({lr for r in rows for lr in r["lrs"]})
    out = ["## Learning-rate sensitivity", "",
           "S = E_η[min(ℓ(η), ℓ_0) − ℓ*] over the swept peak learning rates (Wortsman et al. 2023, arXiv "
           "2309.14322): ℓ(η) the final validation loss (a diverged run counts as ℓ_0), ℓ_0 the loss at "
           "initialisation, ℓ* the best final loss over η; per seed, then mean ± std over seeds. Lower is "
           "more robust to the learning rate.", "",
           "| setting | " + " | ".join(f"ℓ(η={lr:g})" for lr in lrs) + " | ℓ_0 | ℓ* | S | largest stable η |",
           "|---" * (len(lrs) + 5) + "|"]
    for r in rows:
        cells = [_loss_cell(r["final_loss"].get(lr)) for lr in lrs]
        stable = f"{r['largest_stable_lr']:g}" if r["largest_stable_lr"] is not None else "none"
        out.append(f"| {r['setting']} | " + " | ".join(cells) + f" | {r['l0']:.4f} | {r['l_star']:.4f} | "
                   f"{r['sensitivity']:.4f} ± {r['sensitivity_std']:.4f} | {stable} |")
    out += ["", "Diagnostics at each setting's largest stable rate: `diagnostics_profiles.png` (needs "
            "--diagnostics-interval in the pretraining flags).", ""]
    return out


def _loss_cell(value) -> str:
    return "diverged" if value is None or not math.isfinite(value) else f"{value:.4f}"
