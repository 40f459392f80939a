"""bench/throughput.py on CPU at a tiny shape: both models run, alternate, and the JSON/table carry
what the docstring promises (FLOPs from the trainer's formula, MFU only with a known peak)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import throughput  # noqa: E402

TINY = ["--preset", "9m", "--vocab-size", "256", "--micro-batch-size", "2", "--seq-length", "16",
        "--repeats", "2", "--steps", "1", "--warmup", "1"]


def test_rows_table_and_json(tmp_path, capsys):
    out = tmp_path / "t.json"
    rows = throughput.main(TINY + ["--norm-position", "mix", "--peak-tflops", "1.5", "--json", str(out)])
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(rows)) and "bench/throughput.py --preset 9m" in data["command"]
    (row,) = rows
    assert row["norm_position"] == "post,pre*3" and row["dtype"] == "fp32" and row["compile"] is False
    # FLOPs/token: 6 N + 12 L d T with N the non-embedding... i.e. all parameters minus the input embedding
    L, d, T, V = 4, 128, 16, 256
    n = sum(p.numel() for p in throughput.build_mixln(throughput.model_config(
        throughput.parse_args(TINY), throughput.shapes(throughput.parse_args(TINY))[0], "mix"), "cpu").parameters())
    assert row["parameters"] == n
    assert row["flops_per_token"] == 6 * (n - V * d) + 12 * L * d * T
    for impl in ("mixln", "hf"):
        r = row["results"][impl]
        assert len(r["tokens_per_s_rounds"]) == 2 and r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * row["flops_per_token"] / 1.5e12)
        assert r["peak_memory_gib"] is None or r["peak_memory_gib"] > 0
    assert row["ratio"] == pytest.approx(row["results"]["mixln"]["tokens_per_s"] / row["results"]["hf"]["tokens_per_s"])
    assert "| 9m | post,pre*3 | fp32 | off |" in table


def test_cpu_reports_no_mfu_without_a_peak():
    (row,) = throughput.main(TINY + ["--impls", "mixln", "--no-memory"])
    assert row["peak_tflops"] is None and row["results"]["mixln"]["mfu"] is None
    assert "ratio" not in row and "n/a" in " ".join(throughput.fmt_row(row))


def test_same_shape_and_optimizer_for_both_models():
    args = throughput.parse_args(TINY)
    cfg = throughput.model_config(args, throughput.shapes(args)[0], "pre")
    ours = throughput.build_mixln(cfg, "cpu")
    theirs = throughput.build_hf(cfg, "cpu")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    opt = throughput.make_optimizer(ours, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True


@pytest.mark.parametrize("bad,message", [
    (["--micro-batch-size", "0"], "--micro-batch-size: must be a positive integer"),
    (["--norm-position", "sideways"], "norm_position: unknown value 'sideways'"),
    (["--hidden-size", "256"], "shape: give --preset/--presets"),
])
def test_bad_arguments_fail_before_any_work(bad, message):
    argv = [a for a in TINY if a not in ("--preset", "9m")] if bad[0] == "--hidden-size" else TINY
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), *argv, *bad],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
