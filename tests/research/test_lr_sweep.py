"""tools/compare_norms.py --lr-sweep end to end on CPU: every variant trained at every learning rate,
Wortsman et al.'s LR sensitivity re-derived here from the runs' own metrics.jsonl, one TensorBoard run
directory per variant, the figures, a rerun that skips everything, and bad input refused naming the flag."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest

from megatron_mixln.data import IndexedDatasetWriter

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
spec = importlib.util.spec_from_file_location("compare_norms_lr", os.path.join(REPO, "tools", "compare_norms.py"))
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

LRS = (1e-3, 1.0)


def _flags(data):
    flags = dict(vocab_size=256, hidden_size=32, ffn_hidden_size=64, num_layers=3, num_attention_heads=2,
                 seq_length=16, micro_batch_size=4, global_batch_size=4, train_iters=6, lr_warmup_iters=1,
                 eval_iters=1, eval_interval=6, log_interval=1, grad_norm_interval=3, diagnostics_interval=3,
                 max_bad_steps=2, data_path=data + "_train_text_document", valid_data_path=data + "_valid_text_document",
                 wandb_mode="disabled")
    return [x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lr")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("valid", 10)):
        with IndexedDatasetWriter(str(tmp / f"d_{split}_text_document"), dtype=np.uint16) as w:
            for _ in range(n):
                w.add_document(rng.integers(0, 256, 40))
    out = str(tmp / "out")
    argv = ["--positions", "pre,post", "--lr-sweep", ",".join(map(str, LRS)), "--seeds", "1", "--out", out,
            "--parallel", "2", "--skip-layer-analysis", *_flags(str(tmp / "d"))]  # 2 runs at a time: 2 cores
    code = tool.main(argv)
    return {"out": out, "argv": argv, "code": code}


def _records(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return {kind: [r for r in rows if r["kind"] == kind] for kind in ("train", "valid", "diagnostics", "event")}


def test_sensitivity_rederived_from_the_runs_metrics(sweep):
    out = sweep["out"]
    assert sweep["code"] == 0
    res = json.load(open(os.path.join(out, "results.json")))
    rows = {r["setting"]: r for r in res["lr_sensitivity"]}
    assert list(rows) == ["pre", "post"]
    for setting, row in rows.items():
        assert row["lrs"] == list(LRS)
        capped = []
        for lr in LRS:
            rec = _records(os.path.join(out, "runs", f"{setting}-lr{lr:g}-s1"))
            l0 = rec["train"][0]["loss"]  # step 1: the loss of the initial weights (--log-interval 1)
            assert rec["train"][0]["step"] == 1
            diverged = any(e.get("event") == "diverged" for e in rec["event"])
            final = rec["valid"][-1]["valid_loss"] if rec["valid"] else math.nan
            capped.append(l0 if diverged or not math.isfinite(final) else min(final, l0))
            assert len(rec["diagnostics"]) >= 1  # the sweep passed --diagnostics-interval through
        s = sum(capped) / len(capped) - min(capped)
        assert row["sensitivity"] == pytest.approx(s, rel=1e-9, abs=1e-12)
        assert row["l0"] == pytest.approx(l0)
    report = open(os.path.join(out, "report.md")).read()
    assert "## Learning-rate sensitivity" in report
    assert f"{rows['pre']['sensitivity']:.4f}" in report
    assert "## Instability diagnostics (last probed step)" in report  # the diagnostics summarised per run
    for name in ("lr_sensitivity.png", "diagnostics_profiles.png"):
        assert open(os.path.join(out, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # one TensorBoard run directory per variant
    assert sorted(os.listdir(os.path.join(out, "tensorboard"))) == sorted(
        f"{p}-lr{lr:g}-s1" for p in ("pre", "post") for lr in LRS)


def test_rerun_skips_every_finished_run(sweep, capsys):
    assert tool.main(sweep["argv"]) == 0
    assert "4 runs: 4 finished (skipped), 0 to resume, 0 new" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--lr-sweep", "1e-3"], "--lr-sweep '1e-3': the LR sensitivity needs at least two learning rates"),
    (["--lr-sweep", "1e-3,1e-3"], "--lr-sweep '1e-3,1e-3': a learning rate is given twice"),
    (["--lr-sweep", "1e-3,-1"], "--lr-sweep '1e-3,-1': learning rates must be positive"),
    (["--lr-sweep", "1e-3,1e-2", "--lr", "1e-3"], "--lr: set per run by --lr-sweep"),
])
def test_bad_sweeps_name_the_flag(tmp_path, capsys, extra, message):
    argv = ["--positions", "pre", "--out", str(tmp_path / "o"), "--data-path", "x", *extra]
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not os.path.exists(tmp_path / "o")


def test_slurm_tasks_carry_each_runs_learning_rate(sweep, capsys):
    assert tool.main([*sweep["argv"], "--dry-run", "--launcher", "local"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for p in ("pre", "post"):
        for lr in LRS:
            line = next(l for l in lines if l.startswith(f"{p}-lr{lr:g}-s1:"))
            assert f"--lr {lr!r}" in line and "--tensorboard-dir" in line


def test_sensitivity_formula_on_made_up_runs():
    """Two seeds, three rates, one diverged run: S per seed by hand, a diverged rate counts as ℓ_0,
    a final loss above ℓ_0 is capped at ℓ_0, the largest stable rate needs every seed stable."""
    from megatron_mixln.research.lr_sweep import lr_sensitivity

    def run(seed, lr, loss, diverged=False):
        return {"name": f"pre-lr{lr:g}-s{seed}", "base_setting": "pre", "lr": lr, "seed": seed, "diverged": diverged,
                "valid_loss": loss, "train_curve": [[1, 6.0], [2, 5.5]], "vocab_size": 256}

    runs = [run(1, 1e-3, 4.0), run(1, 1e-2, 3.0), run(1, 1e-1, float("nan"), diverged=True),
            run(2, 1e-3, 4.5), run(2, 1e-2, 3.5), run(2, 1e-1, 6.5)]
    (row,) = lr_sensitivity(runs)
    s1 = (4.0 + 3.0 + 6.0) / 3 - 3.0
    s2 = (4.5 + 3.5 + 6.0) / 3 - 3.5
    assert row["sensitivity"] == pytest.approx((s1 + s2) / 2)
    assert row["sensitivity_std"] == pytest.approx(abs(s1 - s2) / math.sqrt(2))
    assert row["largest_stable_lr"] == 1e-2 and row["largest_stable_run"] == "pre-lr0.01-s1"
    assert row["l0"] == 6.0 and row["lrs"] == [1e-3, 1e-2, 1e-1]
    # without a step-1 record, ℓ_0 is ln(vocab size)
    for r in runs:
        r["train_curve"] = [[10, 5.0]]
    assert lr_sensitivity(runs)[0]["l0"] == pytest.approx(math.log(256))
