"""report.md and results.json of a sweep: the Mix-LN paper's Table 1 layout (final validation perplexity,
mean ± sample std over seeds, tokens trained, diverged runs with their step), divergence verdicts,
gradient-norm uniformity (coefficient of variation across layers), the paper-faithful modes used, and
the figures. Numbers are printed with fixed formats (perplexity %.3f, CV %.3f) from results.json."""
from __future__ import annotations

import json
import os

from megatron_mixln.research.collect import aggregate
from megatron_mixln.research.lr_sweep import lr_sensitivity, render_lr_section

NAMES = {"pre": "Pre-LN", "post": "Post-LN", "mix": "Mix-LN", "peri": "Peri-LN", "lns": "LNS",
         "deepnorm": "DeepNorm", "deeppost": "DeepPost (reference DeepNorm)",
         "siamese": "SiameseNorm", "residual-dual": "ResiDual"}
FIGURES = (("curves.png", "Training loss and validation perplexity"),
           ("grad_norm_profiles.png", "Per-layer gradient norms at several points of training"),
           ("angular_distance.png", "Angular distance between layers"),
           ("layer_removal.png", "Perplexity increase when one layer is removed"),
           ("alpha.png", "Perplexity vs post-layer fraction (α)"),
           ("lr_sensitivity.png", "Final loss against the peak learning rate"),
           ("diagnostics_profiles.png", "Instability diagnostics per layer at each setting's largest stable rate"))


def label(row: dict) -> str:
    name = NAMES.get(row["position"], row["position"])
    if row["fraction"] is not None:
        return f"{name} (α={100 * row['fraction']:g}%)"
    if row["position"] == "mix" and row.get("positions"):
        first = row["positions"].split(",")[0]
        k = first.split("*")[1] if first.startswith("post*") else "1" if first == "post" else "0"
        return f"{name} (k={k})"
    return name


def ppl_cell(row: dict) -> str:
    if row["ppl_mean"] is None:
        return "—"
    return f"{row['ppl_mean']:.3f} ± {row['ppl_std']:.3f}"


def diverged_cell(row: dict) -> str:
    if not row["diverged"]:
        return "no"
    return "; ".join(f"seed {d['seed']} at step {d['step']}" for d in row["diverged"])


def results(sweep_record: dict, runs: list[dict]) -> dict:
    rows = aggregate(runs)
    return {"sweep": sweep_record, "settings": rows, "runs": runs, "lr_sensitivity": lr_sensitivity(runs)}


def write_report(out: str, sweep_record: dict, runs: list[dict], figures: list[str]) -> dict:
    from megatron_mixln.fileio import atomic_write_json, atomic_write_text

    res = results(sweep_record, runs)
    atomic_write_json(os.path.join(out, "results.json"), res)
    atomic_write_text(os.path.join(out, "report.md"), render(res, [os.path.basename(f) for f in figures]))
    return res


def _setup_lines(common: dict, runs: list[dict]) -> list[str]:
    m, t = common.get("model", {}), common.get("training", {})
    lines = [
        f"- model: {m.get('num_layers')} layers, hidden {m.get('hidden_size')}, ffn {m.get('ffn_hidden_size')}, "
        f"{m.get('num_attention_heads')} heads, vocab {m.get('vocab_size')}, sequence length {m.get('seq_length')}",
        f"- training: {t.get('train_iters')} steps, global batch {t.get('global_batch_size') or 'micro x dp'} "
        f"(micro {t.get('micro_batch_size')}), {t.get('optimizer')} lr {t.get('lr')} -> {t.get('min_lr')} "
        f"({t.get('lr_decay_style')}, warm-up {t.get('lr_warmup_iters')}), weight decay {t.get('weight_decay')}, "
        f"clip {t.get('clip_grad')}",
        f"- data: {' '.join(t.get('data_path') or [])}; evaluation: "
        f"{' '.join(t.get('valid_data_path') or []) or 'split ' + str(t.get('split'))}",
        "- every variant of a seed has the same data order, initial seed, LR schedule, batch and evaluation set",
    ]
    modes = runs[0]["modes"] if runs else {}
    lines.append("- paper-faithful modes: " + ", ".join(f"{k} = {v}" for k, v in modes.items()))
    return lines


def render(res: dict, figures: list[str]) -> str:
    rows, runs, sweep = res["settings"], res["runs"], res["sweep"]
    out = ["# Norm-position comparison", ""]
    if sweep.get("command"):
        out += ["Command:", "", "```", " ".join(sweep["command"]), "```", ""]
    out += ["## Setup", "", *_setup_lines(sweep.get("common", {}), runs), ""]
    out += ["## Table 1: final validation perplexity", "",
            "| variant | layers | validation perplexity (mean ± std) | seeds | tokens trained | diverged |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        tokens = f"{r['tokens_trained']:,}" if r["tokens_trained"] is not None else "—"
        unfinished = f" ({len(r['unfinished'])} unfinished)" if r["unfinished"] else ""
        out.append(f"| {label(r)} | {r['positions'] or '—'} | {ppl_cell(r)} | {len(r['ppl'])}/{len(r['seeds'])}"
                   f"{unfinished} | {tokens} | {diverged_cell(r)} |")
    out += ["", "Mean and sample standard deviation over the seeds that finished without diverging.", ""]
    out += render_lr_section(res.get("lr_sensitivity") or [])
    out += ["## Divergence verdict", ""]
    any_note = False
    for run in runs:
        notes = []
        if run["diverged"]:
            notes.append(f"**diverged at step {run['diverged_at']}** ({run['divergence_reason']})")
        for rb in run["rollbacks"]:
            notes.append(f"spike from step {rb['first_spike_step']} rolled back to iteration {rb['to_iteration']} "
                         f"(lr scale {rb['lr_scale']:g})")
        if notes:
            any_note = True
            out.append(f"- {run['name']}: " + "; ".join(notes))
    if not any_note:
        out.append("- no run diverged and no rollback was needed")
    out += ["", "## Gradient-norm uniformity across layers", "",
            "Coefficient of variation (population std / mean) of the per-layer gradient norms; lower is more even.", ""]
    steps = sorted({p["step"] for run in runs for p in run["grad_norm_profiles"]})
    if steps:
        out += ["| run | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        for run in runs:
            by_step = {p["step"]: p["cv"] for p in run["grad_norm_profiles"]}
            cells = [f"{by_step[s]:.3f}" if s in by_step else "—" for s in steps]
            out.append(f"| {run['name']} | " + " | ".join(cells) + " |")
    else:
        out.append("(no per-layer gradient norms logged: pass --grad-norm-interval N)")
    out += _diagnostics_lines(runs)
    out += ["", "## Runs", "", "| run | state | final step | validation loss | validation perplexity | "
            "validation tokens | tokens trained |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        vl = f"{run['valid_loss']:.4f}" if run["valid_loss"] is not None else "—"
        vp = f"{run['valid_ppl']:.3f}" if run["valid_ppl"] is not None else "—"
        tok = f"{run['tokens_trained']:,}" if run["tokens_trained"] is not None else "—"
        out.append(f"| {run['name']} | {run['state']} | {run['final_step']} | {vl} | {vp} | "
                   f"{run['valid_tokens']} | {tok} |")
    if figures:
        out += ["", "## Figures", ""]
        titles = dict(FIGURES)
        for f in figures:
            out += [f"### {titles.get(f, f)}", "", f"![{titles.get(f, f)}]({f})", ""]
    return "\n".join(out) + "\n"


def _diagnostics_lines(runs: list[dict]) -> list[str]:
    """The --diagnostics-interval summary of each run's last probed step: the extreme layer of each metric."""
    from megatron_mixln.research.plot_style import layer_values

    rows = [r for r in runs if r.get("diagnostics")]
    if not rows:
        return []
    cols = (("act_rms_out", max, "max residual RMS"), ("act_max_over_median", max, "max act max/median"),
            ("act_kurtosis", max, "max kurtosis"), ("attn_logit_max", max, "max attention logit"),
            ("attn_entropy", min, "min attention entropy"), ("update_ratio", max, "max update/weight"))
    out = ["", "## Instability diagnostics (last probed step)", "",
           "The extreme layer of each per-layer metric (value @ layer), and the output logits' largest logsumexp z.", "",
           "| run | step | " + " | ".join(c[2] for c in cols) + " | z max |", "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        d, cells = r["diagnostics"], []
        for metric, pick, _ in cols:
            values = layer_values(d, metric)
            if values:
                layer = pick(values, key=values.get)
                cells.append(f"{values[layer]:.4g} @ {layer}")
            else:
                cells.append("—")
        z = f"{d['z_max']:.4g}" if d.get("z_max") is not None else "—"
        out.append(f"| {r['name']} | {d.get('step')} | " + " | ".join(cells) + f" | {z} |")
    return out


def load_results(out: str) -> dict:
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)
