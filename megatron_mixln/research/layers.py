"""Per-run layer diagnostics of a sweep (angular distance, layer removal) through tools/analyze_layers.py.

The tool's `main(argv)` is called in this process (no new interpreter per run) on the run's final
checkpoint and the sweep's validation data; it writes RUN/layers/layer_analysis.json and its plots.
A run whose analysis is newer than its checkpoint pointer is not analysed again.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os

from megatron_mixln.checkpoint.layout import latest_path


def _tool(repo: str):
    path = os.path.join(repo, "tools", "analyze_layers.py")
    spec = importlib.util.spec_from_file_location("mixln_analyze_layers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def analysis_data_prefix(training: dict) -> str | None:
    """The first prefix of --valid-data-path, else of --data-path (weights skipped)."""
    for key in ("valid_data_path", "data_path"):
        for token in training.get(key) or []:
            try:
                float(token)
            except ValueError:
                return token
    return None


def analyze_run(repo: str, run_dir: str, data_prefix: str, seq_length: int, num_samples: int,
                micro_batch_size: int, seed: int) -> int:
    """-> the tool's exit code (0 ok); its console output goes to RUN/layers/analysis.log."""
    ckpt, out = os.path.join(run_dir, "ckpt"), os.path.join(run_dir, "layers")
    result = os.path.join(out, "layer_analysis.json")
    latest = latest_path(ckpt)
    if not os.path.isfile(latest):
        return 1
    if os.path.isfile(result) and os.path.getmtime(result) >= os.path.getmtime(latest):
        return 0
    os.makedirs(out, exist_ok=True)
    argv = ["--checkpoint", ckpt, "--data-path", data_prefix, "--seq-length", str(seq_length),
            "--num-samples", str(num_samples), "--micro-batch-size", str(micro_batch_size), "--seed", str(seed),
            "--out", out]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = _tool(repo).main(argv)
    with open(os.path.join(out, "analysis.log"), "w") as fh:
        fh.write(buf.getvalue())
    return code
