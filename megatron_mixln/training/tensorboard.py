"""--tensorboard-dir: the metrics.jsonl scalars as TensorBoard events (rank 0 only, as Megatron-LM).

Tags are the ones wandb gets: `kind/name` for a plain name ("train/loss", "train/lr",
"valid/valid_ppl"), the name itself when it already has a slash ("grad_norm/layer_01/attn",
"act_rms_out/layer_03"); the x-axis is the training step. Non-numeric values (events) are skipped.
"""
from __future__ import annotations

import math
import sys


def scalar_tag(kind: str, key: str) -> str:
    """The tag of metrics.jsonl's `key` in a record of `kind` (the same mapping as wandb's)."""
    return key if "/" in key else f"{kind}/{key}"


def scalars_of(kind: str, values: dict) -> dict[str, float]:
    """The numeric, finite-or-not scalars of one record, by tag (bools and strings dropped)."""
    return {scalar_tag(kind, k): float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardWriter:
    """A thin owner of torch.utils.tensorboard.SummaryWriter: `log` per record, `close` flushes.

    `flush_secs` bounds what a killed job loses; a preempted run (SIGTERM caught by the trainer)
    leaves its loop normally and `close` writes the rest."""

    def __init__(self, log_dir: str, flush_secs: int = 30):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=log_dir, flush_secs=flush_secs)

    def log(self, kind: str, step: int, values: dict) -> None:
        if kind == "event":
            return
        for tag, value in scalars_of(kind, values).items():
            self._writer.add_scalar(tag, value if math.isfinite(value) else float("nan"), global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def start_tensorboard(log_dir: str) -> TensorBoardWriter | None:
    """A writer, or None with one warning line when the `tensorboard` package is missing."""
    try:
        return TensorBoardWriter(log_dir)
    except ImportError as exc:
        print(f"[metrics] --tensorboard-dir {log_dir}: TensorBoard disabled ({exc}); pip install tensorboard",
              file=sys.stderr, flush=True)
        return None
