"""Read a sweep's run directories into plain numbers: final perplexity, tokens trained, divergence verdict,
per-layer gradient-norm profiles with their coefficient of variation, and seed aggregates.

Everything comes from each run's `metrics.jsonl` and `config.json` (written by the trainer) and, when
the layer analysis ran, `layers/layer_analysis.json` (tools/analyze_layers.py).

Divergence verdict of a run (first rule that applies):
  1. the trainer stopped it as diverged (exit code 3, `diverged` event) -> diverged at that step;
  2. the last validation loss is not finite -> diverged at the first non-finite training loss, else at
     that evaluation;
  3. the training loss went non-finite or above FACTOR x the lowest loss logged before it, and never
     came back below that threshold -> diverged at the first such step.
Rollbacks (`rollback` events) are listed as recovered spikes; a run that recovered is not diverged.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics

GRAD_KEY = re.compile(r"^grad_norm/layer_(\d+)/(\w+)$")


def read_metrics(run_dir: str) -> dict:
    """{"train": [...], "valid": [...], "grad_norms": [...], "events": [...]} of a run directory (see
    training.metrics.read_metrics: the last record of a step wins, a torn last line is ignored)."""
    from megatron_mixln.training.metrics import read_metrics as read_metrics_file

    return read_metrics_file(os.path.join(run_dir, "metrics.jsonl"))


def layer_profile(record: dict) -> list[float]:
    """One grad_norms record -> per-layer gradient norm sqrt(sum over the layer's sublayers of norm^2)."""
    sq: dict[int, float] = {}
    for key, value in record.items():
        m = GRAD_KEY.match(key)
        if m and value is not None:
            sq[int(m[1])] = sq.get(int(m[1]), 0.0) + float(value) ** 2
    return [math.sqrt(sq[l]) for l in sorted(sq)]


def coefficient_of_variation(values: list[float]) -> float:
    """Population std / mean across layers (NaN for an empty or zero-mean profile)."""
    if not values or statistics.fmean(values) == 0:
        return float("nan")
    return statistics.pstdev(values) / statistics.fmean(values)


def pick_points(n: int, k: int = 4) -> list[int]:
    """Up to k indices spread over range(n), always including the last."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def divergence_verdict(metrics: dict, exit_code: int | None, factor: float) -> tuple[int | None, str | None]:
    """-> (step it diverged at, reason) or (None, None)."""
    for e in metrics["events"]:
        if e.get("event") == "diverged":
            return e["step"], "stopped by the trainer (non-finite steps or spikes after rollbacks)"
    train = [(r["step"], r.get("loss")) for r in metrics["train"]]
    if exit_code == 3:
        return (train[-1][0] if train else None), "exit code 3 (diverged)"
    first_bad = next((s for s, l in train if l is None or not math.isfinite(l)), None)
    if metrics["valid"] and not math.isfinite(metrics["valid"][-1].get("valid_loss", float("nan"))):
        return first_bad or metrics["valid"][-1]["step"], "non-finite validation loss"
    best = math.inf
    for i, (step, loss) in enumerate(train):
        bad = loss is None or not math.isfinite(loss) or loss > factor * best
        if bad and all(l is None or not math.isfinite(l) or l > factor * best for _, l in train[i:]):
            return step, f"training loss above {factor:g} x its best ({best:.3f}) from here on"
        if loss is not None and math.isfinite(loss):
            best = min(best, loss)
    return None, None


def collect_run(run_dir: str, variant, state: str, factor: float) -> dict:
    metrics = read_metrics(run_dir)
    config = _json(os.path.join(run_dir, "config.json")) or {}
    status = _json(os.path.join(run_dir, "status.json")) or {}
    model, training = config.get("model", {}), config.get("training", {})
    last_train = metrics["train"][-1] if metrics["train"] else {}
    last_valid = metrics["valid"][-1] if metrics["valid"] else {}
    seq = model.get("seq_length")
    tokens = last_train.get("consumed_tokens")
    if tokens is None and last_train.get("consumed_samples") is not None and seq:
        tokens = last_train["consumed_samples"] * seq
    diverged_at, reason = divergence_verdict(metrics, status.get("exit_code"), factor)
    grads = metrics["grad_norms"]
    profiles = [{"step": grads[i]["step"], "layers": layer_profile(grads[i])} for i in pick_points(len(grads))]
    for p in profiles:
        p["cv"] = coefficient_of_variation(p["layers"])
    analysis = _json(os.path.join(run_dir, "layers", "layer_analysis.json"))
    diagnostics = metrics["diagnostics"][-1] if metrics["diagnostics"] else None
    return {
        "name": variant.name, "setting": variant.setting, "position": variant.position,
        "base_setting": getattr(variant, "base_setting", variant.setting), "lr": getattr(variant, "lr", None),
        "vocab_size": model.get("vocab_size"),
        "fraction": variant.fraction, "post_ln_layers": variant.post_ln_layers, "seed": variant.seed,
        "positions": config.get("positions"), "state": state,
        "final_step": last_train.get("step"), "train_iters": training.get("train_iters"),
        "valid_step": last_valid.get("step"), "valid_loss": last_valid.get("valid_loss"),
        "valid_ppl": last_valid.get("valid_ppl"), "valid_tokens": last_valid.get("valid_tokens"),
        "tokens_trained": tokens, "diverged": diverged_at is not None, "diverged_at": diverged_at,
        "divergence_reason": reason,
        "rollbacks": [{"step": e["step"], "first_spike_step": e.get("first_spike_step"),
                       "to_iteration": e.get("to_iteration"), "lr_scale": e.get("lr_scale")}
                      for e in metrics["events"] if e.get("event") == "rollback"],
        "loss_spikes": sum(1 for e in metrics["events"] if e.get("event") == "loss_spike"),
        "grad_norm_profiles": profiles, "grad_norm_cv": profiles[-1]["cv"] if profiles else None,
        "modes": modes_of(model, training),
        "train_curve": [[r["step"], r.get("loss")] for r in metrics["train"]],
        "valid_curve": [[r["step"], r.get("valid_ppl")] for r in metrics["valid"]],
        "layer_analysis": analysis,
        # the last --diagnostics-interval record: {"step": ..., "act_rms_out/layer_01": ..., ...}
        "diagnostics": {k: v for k, v in diagnostics.items() if k not in ("kind", "time")} if diagnostics else None,
    }


def modes_of(model: dict, training: dict) -> dict:
    """The paper-faithful choices a run was trained with (from its config.json)."""
    return {
        "sample_mode": training.get("sample_mode", "pack"),
        "precision": "bf16-pure" if training.get("bf16_pure") else "bf16" if training.get("bf16") else "fp32",
        "eval": f"{training['eval_tokens']} tokens" if training.get("eval_tokens")
        else f"{training.get('eval_iters')} x global batch samples",
        "embedding_init": "sqrt(2/5)" if model.get("scaled_embedding_init") else f"N(0, {model.get('init_method_std')})",
        "scaled_output_init": "all" if model.get("scaled_output_init") else model.get("scaled_output_init_layers"),
        "residual_gates": model.get("residual_gate_layers"),
        "freeze_pad_embedding": bool(model.get("freeze_pad_embedding")),
        "optimizer": training.get("optimizer"), "weight_decay": training.get("weight_decay"),
        "rollback_on_spike": training.get("rollback_on_spike") or None,
    }


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per swept setting, in first-seen order: perplexity mean and sample std (ddof=1) over the
    seeds that finished without diverging; diverged seeds listed with their step."""
    rows: dict[str, dict] = {}
    for r in runs:
        row = rows.setdefault(r["setting"], {"setting": r["setting"], "position": r["position"],
                                             "fraction": r["fraction"], "post_ln_layers": r["post_ln_layers"],
                                             "lr": r.get("lr"),
                                             "positions": r["positions"], "seeds": [], "ppl": [], "diverged": [],
                                             "unfinished": [], "tokens": [], "cv": []})
        row["seeds"].append(r["seed"])
        if r["diverged"]:
            row["diverged"].append({"seed": r["seed"], "step": r["diverged_at"], "valid_ppl": r["valid_ppl"]})
        elif r["state"] != "finished" or r["valid_ppl"] is None:
            row["unfinished"].append(r["seed"])
        else:
            row["ppl"].append(r["valid_ppl"])
            if r["grad_norm_cv"] is not None:
                row["cv"].append(r["grad_norm_cv"])
        if r["tokens_trained"] is not None:
            row["tokens"].append(r["tokens_trained"])
    for row in rows.values():
        ppl = row["ppl"]
        row["ppl_mean"] = statistics.fmean(ppl) if ppl else None
        row["ppl_std"] = statistics.stdev(ppl) if len(ppl) > 1 else (0.0 if ppl else None)
        row["cv_mean"] = statistics.fmean(row["cv"]) if row["cv"] else None
        row["tokens_trained"] = max(row["tokens"]) if row["tokens"] else None
    return list(rows.values())


def _json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)
