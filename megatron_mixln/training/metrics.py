"""Where numbers go: the console, RUN_DIR/metrics.jsonl (one JSON object per line, `kind` = train,
valid, grad_norms, diagnostics or event) and, optionally, Weights & Biases and TensorBoard
(--tensorboard-dir). Only rank 0 writes.

Nothing from the environment is ever logged: the configs are the only run metadata, and wandb
reads its key from its own login, never from us.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings

from megatron_mixln.training.tensorboard import scalar_tag, start_tensorboard


class MetricsLogger:
    def __init__(self, run_dir: str | None, enabled: bool, config: dict, wandb_project: str | None = None,
                 wandb_name: str | None = None, wandb_mode: str = "offline", tensorboard_dir: str | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self._file = None
        self._wandb = None
        self._tensorboard = None
        if not enabled:
            return
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "config.json"), "w") as fh:
                json.dump(config, fh, indent=1, default=str)
            self._file = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)  # line-buffered
        if wandb_project and wandb_mode != "disabled":
            self._wandb = _start_wandb(wandb_project, wandb_name, wandb_mode, run_dir, config)
        if tensorboard_dir:
            self._tensorboard = start_tensorboard(tensorboard_dir)

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        if self._file:
            self._file.write(json.dumps(record, default=_jsonable) + "\n")
        if self._wandb is not None:
            self._wandb.log({scalar_tag(kind, k): v for k, v in values.items() if isinstance(v, (int, float))},
                            step=step)
        if self._tensorboard is not None:
            self._tensorboard.log(kind, step, values)

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _start_wandb(project, name, mode, run_dir, config):
    try:
        import wandb
    except ImportError:
        warnings.warn("--wandb-project given but wandb is not importable; logging to metrics.jsonl only")
        return None
    try:
        return wandb.init(project=project, name=name, mode=mode, dir=run_dir, config=config)
    except Exception as exc:  # wandb must never stop a training run
        print(f"[metrics] wandb disabled: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def format_train_line(step: int, train_iters: int, v: dict) -> str:
    parts = [f"step {step:>6d}/{train_iters}", f"loss {v['loss']:.4f}", f"lr {v['lr']:.3e}"]
    gn = v.get("grad_norm")
    parts.append(f"grad norm {gn:.3f}" if gn is not None and math.isfinite(gn) else f"grad norm {gn}")
    if v.get("z_loss") is not None:
        parts.append(f"z-loss {v['z_loss']:.3e}")
    parts.append(f"tok/s {v['tokens_per_sec']:,.0f}")
    if v.get("mfu") is not None:
        parts.append(f"mfu {100 * v['mfu']:.1f}%")
    parts.append(f"mem {v['memory_gib']:.2f} GiB")
    if v.get("skipped_steps"):
        parts.append(f"skipped {v['skipped_steps']}")
    return " | ".join(parts)


def paper_modes(model_config, cfg) -> str:
    """The paper-faithful choices of this run, in one line (they are also in config.json)."""
    parts = [f"sample-mode {cfg.sample_mode}", "pure bf16" if cfg.bf16_pure else "bf16 (fp32 masters)" if cfg.bf16
             else "fp32", f"eval {cfg.eval_tokens} tokens" if cfg.eval_tokens else f"eval {cfg.eval_iters} iters",
             f"embedding std {'sqrt(2/5)' if model_config.scaled_embedding_init else model_config.init_method_std}"]
    if model_config.learnable_embedding_scale:
        parts.append("embedding x learnable scale (init sqrt(hidden))")
    if model_config.scaled_output_layers:
        parts.append(f"scaled output init on layers {list(model_config.scaled_output_layers)}")
    if model_config.gated_layers:
        parts.append(f"residual gates on layers {list(model_config.gated_layers)} (init {model_config.residual_gate_init})")
    if model_config.freeze_pad_embedding:
        parts.append(f"frozen pad embedding row {model_config.pad_id}")
    if cfg.rollback_on_spike:
        parts.append(f"rollback on spike x{cfg.rollback_on_spike} for {cfg.rollback_patience} steps "
                     f"(lr factor {cfg.rollback_lr_factor})")
    return ", ".join(parts)


METRIC_KINDS = ("train", "valid", "grad_norms", "diagnostics")


def read_metrics(path: str) -> dict[str, list[dict]]:
    """A run's metrics.jsonl -> {"train", "valid", "grad_norms", "diagnostics": records sorted by step,
    "events": in order}.

    The last record of a (kind, step) wins (a resumed or rolled-back run logs a step again); a torn last
    line (a run killed mid-write) is ignored; a missing file reads as empty. Raises ValueError naming
    `path:line` for any other line that is not JSON."""
    records: dict[tuple[str, int], dict] = {}
    events = []
    if os.path.isfile(path):
        with open(path) as fh:
            lines = fh.read().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):
                    continue
                raise ValueError(f"{path}:{n}: not JSON") from None
            if rec.get("kind") == "event":
                events.append(rec)
            elif rec.get("kind") in METRIC_KINDS:
                records[(rec["kind"], rec["step"])] = rec
    out = {k: sorted((r for (kind, _), r in records.items() if kind == k), key=lambda r: r["step"])
           for k in METRIC_KINDS}
    out["events"] = events
    return out
