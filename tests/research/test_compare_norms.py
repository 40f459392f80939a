"""tools/compare_norms.py end to end on a CPU-sized sweep (4-layer model, 8 steps, 2 seeds, a fraction
sweep): an interrupted run is resumed, finished runs are skipped on a rerun, and every number of the
report is recomputed here from the metrics files it came from. Bad input fails before training."""
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import sys

import numpy as np
import pytest

from megatron_mixln.data import IndexedDatasetWriter

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
spec = importlib.util.spec_from_file_location("compare_norms_tool", os.path.join(REPO, "tools", "compare_norms.py"))
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

TRAIN_ITERS, GLOBAL_BATCH, SEQ = 8, 8, 16


def _data(tmp):
    rng = np.random.default_rng(0)
    for split, n in (("train", 80), ("valid", 20)):
        with IndexedDatasetWriter(str(tmp / f"d_{split}_text_document"), dtype=np.uint16) as w:
            for _ in range(n):
                w.add_document(rng.integers(0, 256, 40))
    return str(tmp / "d")


def _flags(data, **extra):
    flags = dict(vocab_size=256, hidden_size=32, ffn_hidden_size=64, num_layers=4, num_attention_heads=2,
                 seq_length=SEQ, micro_batch_size=4, global_batch_size=GLOBAL_BATCH, train_iters=TRAIN_ITERS, lr=1e-2,
                 lr_warmup_iters=2, eval_iters=2, eval_interval=4, log_interval=2, grad_norm_interval=2,
                 save_interval=4, data_path=data + "_train_text_document",
                 valid_data_path=data + "_valid_text_document")
    flags.update(extra)
    out = []
    for k, v in flags.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


SWEEP = ["--positions", "mix", "--post-ln-fraction", "0,0.5", "--seeds", "1,2"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    data = _data(tmp)
    out = str(tmp / "out")
    # An interrupted run: one variant stops at step 4 (--exit-interval does not change the sweep's identity).
    first = tool.main(["--positions", "mix", "--post-ln-fraction", "0", "--seeds", "1", "--out", out,
                       "--skip-layer-analysis", *_flags(data, exit_interval=4)])
    assert first == 1  # reported, but unfinished
    assert open(os.path.join(out, "runs", "mix-a0-s1", "ckpt", "latest")).read().strip() == "iter_0000004"
    code = tool.main([*SWEEP, "--out", out, "--parallel", "2", "--analysis-samples", "8", *_flags(data)])
    assert code == 0
    return {"out": out, "data": data, "tmp": tmp}


def _metrics(run_dir):
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    last = {}
    for r in recs:
        last[(r["kind"], r["step"], r.get("event"))] = r
    return recs, sorted(last.values(), key=lambda r: r["step"])


def test_report_numbers_come_from_the_metrics_files(sweep):
    out = sweep["out"]
    res = json.load(open(os.path.join(out, "results.json")))
    report = open(os.path.join(out, "report.md")).read()
    settings = {r["setting"]: r for r in res["settings"]}
    assert list(settings) == ["mix-a0", "mix-a0.5"]
    for setting, fraction in (("mix-a0", 0.0), ("mix-a0.5", 0.5)):
        ppl, tokens = [], []
        for seed in (1, 2):
            run_dir = os.path.join(out, "runs", f"{setting}-s{seed}")
            _, recs = _metrics(run_dir)
            valid = [r for r in recs if r["kind"] == "valid"]
            train = [r for r in recs if r["kind"] == "train"]
            assert valid[-1]["step"] == TRAIN_ITERS
            ppl.append(math.exp(valid[-1]["valid_loss"]))
            tokens.append(train[-1]["consumed_tokens"])
            run = next(r for r in res["runs"] if r["name"] == f"{setting}-s{seed}")
            assert run["valid_ppl"] == pytest.approx(ppl[-1], rel=1e-9)
            # Per-layer profile and CV recomputed from the grad_norms record of the last step.
            g = next(r for r in recs if r["kind"] == "grad_norms" and r["step"] == TRAIN_ITERS)
            layers = [math.sqrt(sum(v ** 2 for k, v in g.items() if k.startswith(f"grad_norm/layer_{l:02d}/")))
                      for l in range(1, 5)]
            assert run["grad_norm_profiles"][-1]["layers"] == pytest.approx(layers, rel=1e-12)
            cv = float(np.std(layers) / np.mean(layers))
            assert run["grad_norm_cv"] == pytest.approx(cv, rel=1e-9)
            assert f"| {setting}-s{seed} |" in report and f"{cv:.3f}" in report
        assert tokens == [TRAIN_ITERS * GLOBAL_BATCH * SEQ] * 2
        mean, std = float(np.mean(ppl)), float(np.std(ppl, ddof=1))
        row = settings[setting]
        assert row["ppl_mean"] == pytest.approx(mean, rel=1e-9) and row["ppl_std"] == pytest.approx(std, rel=1e-9)
        line = next(l for l in report.splitlines() if l.startswith(f"| Mix-LN (α={100 * fraction:g}%)"))
        assert f"{mean:.3f} ± {std:.3f}" in line and f"{tokens[0]:,}" in line and line.rstrip().endswith("| no |")
    for name in ("curves.png", "grad_norm_profiles.png", "angular_distance.png", "layer_removal.png", "alpha.png"):
        assert open(os.path.join(out, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in report
    # Layer diagnostics came from tools/analyze_layers.py on each run's final checkpoint.
    la = json.load(open(os.path.join(out, "runs", "mix-a0.5-s1", "layers", "layer_analysis.json")))
    assert la["positions"] == ["post", "post", "pre", "pre"] and len(la["layer_removal"]) == 4
    assert "sample_mode = pack" in report and "precision = fp32" in report


def test_interrupted_run_was_resumed_and_a_rerun_skips_everything(sweep, capsys):
    out = sweep["out"]
    recs, _ = _metrics(os.path.join(out, "runs", "mix-a0-s1"))
    assert [r["step"] for r in recs if r["kind"] == "event" and r["event"] == "resumed"] == [4]
    assert max(r["step"] for r in recs if r["kind"] == "train") == TRAIN_ITERS
    before = {n: open(os.path.join(out, "runs", n, "metrics.jsonl")).read() for n in os.listdir(os.path.join(out, "runs"))}
    capsys.readouterr()
    assert tool.main([*SWEEP, "--out", out, "--analysis-samples", "8", *_flags(sweep["data"])]) == 0
    assert "4 runs: 4 finished (skipped), 0 to resume, 0 new" in capsys.readouterr().out
    after = {n: open(os.path.join(out, "runs", n, "metrics.jsonl")).read() for n in before}
    assert after == before


@pytest.mark.parametrize("args, message", [
    (["--positions", "pre,postln"], "--positions: unknown position 'postln'"),
    (["--positions", "mix", "--post-ln-fraction", "0.25,1.5"], "--post-ln-fraction: 1.5 is not a fraction"),
    (["--positions", "mix", "--post-ln-fraction", "a"], "--post-ln-fraction 'a': expected a comma-separated list"),
    (["--positions", "pre", "--post-ln-fraction", "0.25"], "a fraction sweep needs 'mix' in --positions"),
    (["--positions", "pre", "--seed", "3"], "--seed: set by the sweep for every run"),
    (["--positions", "pre", "--hidden-size", "30"], "run pre-s1234: --hidden-size/--num-attention-heads: head dim must be even"),
])
def test_bad_input_fails_before_training(sweep, capsys, args, message):
    out = str(sweep["tmp"] / "bad")
    flags = _flags(sweep["data"])
    assert tool.main(["--out", out, *flags, *args]) == 2  # flags given later win
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)


def test_an_out_dir_of_another_configuration_is_refused(sweep, capsys):
    assert tool.main([*SWEEP, "--out", sweep["out"], *_flags(sweep["data"], lr=2e-2)]) == 2
    err = capsys.readouterr().err
    assert f"--out {sweep['out']}: holds runs of another configuration (lr (0.01 vs 0.02)" in err


def test_variants_differing_beyond_the_swept_setting_are_refused(sweep):
    from megatron_mixln.research.sweep import SweepError, Sweep, build_sweep, validate

    s = build_sweep("pre,post", None, "1", None, _flags(sweep["data"]), str(sweep["tmp"] / "x"))

    class Skewed(Sweep):
        def pretrain_args(self, v, config_path=None):
            extra = ["--ffn-hidden-size", "96"] if v.position == "post" else []
            return super().pretrain_args(v, config_path) + extra

    with pytest.raises(SweepError, match=r"run post-s1 differs from run pre-s1 in ffn_hidden_size \(64 vs 96\)"):
        validate(Skewed(s.variants, s.passthrough, s.config_values, s.out))


def _fake_bin(tmp, name, body):
    path = tmp / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def test_slurm_array_submission_and_collection(sweep, monkeypatch, capsys):
    """No cluster: a fake sbatch records the submission, each array task runs slurm/compare_norms_task.sh
    with a fake pretrain script that dumps its environment, and collection reads the finished runs."""
    import subprocess

    tmp, data = sweep["tmp"], sweep["data"]
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    calls = tmp / "sbatch_calls"
    _fake_bin(bin_dir, "sbatch", f'echo "$@" >> {calls}\necho "4242;cluster"\n')
    queue = tmp / "queue"
    _fake_bin(bin_dir, "squeue", f'cat {queue} 2>/dev/null || true\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = str(tmp / "slurm_out")
    flags = _flags(data) + ["--preset", "9m", "--tokenizer", "null:255"]
    assert tool.main([*SWEEP, "--out", out, "--launcher", "slurm", "--parallel", "2",
                      "--sbatch-args", "--nodes=1 --gpus-per-node=8", *flags]) == 0
    submitted = calls.read_text().split()
    assert submitted[:2] == ["--parsable", "--array=0-3%2"] and "--nodes=1" in submitted and "--gpus-per-node=8" in submitted
    assert submitted[-1] == os.path.join(REPO, "slurm", "compare_norms_task.sh")
    export = next(a for a in submitted if a.startswith("--export="))
    assert f"MIXLN_TASK_DIR={out}/slurm" in export
    names = json.load(open(os.path.join(out, "slurm", "tasks.json")))
    assert names == ["mix-a0-s1", "mix-a0-s2", "mix-a0.5-s1", "mix-a0.5-s2"]

    # Each task, as Slurm would start it: compare_norms_task.sh -> the real slurm/pretrain_7b_mixln.sh (DRY_RUN=1
    # prints the trainer command after every check): exactly the flags --launcher local runs, none of the 7B
    # job's own defaults (a --preset 9m sweep must not become a 7B run).
    from megatron_mixln.research.launch import local_command
    from megatron_mixln.research.sweep import build_sweep

    _fake_bin(bin_dir, "scontrol", 'case "$2" in hostnames) echo n1 ;; node) echo "NodeName=n1 NodeAddr=127.0.0.1" ;; esac\n')
    same = build_sweep("mix", "0,0.5", "1,2", None, flags, out)
    by_name = {v.name: v for v in same.variants}
    for i, name in enumerate(names):
        env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(i), MIXLN_TASK_DIR=os.path.join(out, "slurm"), ROOT=REPO,
                   SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1", DRY_RUN="1", VENV=sys.prefix)
        done = subprocess.run(["bash", os.path.join(REPO, "slurm", "compare_norms_task.sh")], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        line = next(l for l in done.stdout.splitlines() if l.startswith("dry run: "))
        argv = shlex.split(line[len("dry run: "):])
        ran = argv[argv.index("megatron_mixln.pretrain") + 1:]
        want = local_command(same, by_name[name])
        assert ran == want[want.index("megatron_mixln.pretrain") + 1:]
        assert "--preset" in ran and ran[ran.index("--preset") + 1] == "9m" and "--bf16" not in ran

    # While the array is queued, a rerun submits nothing.
    queue.write_text("4242_0\n")
    capsys.readouterr()
    assert tool.main([*SWEEP, "--out", out, "--launcher", "slurm", *flags]) == 0
    assert "job array 4242 is still queued or running" in capsys.readouterr().out
    assert len(calls.read_text().splitlines()) == 1

    # The array finished (runs copied in from the local sweep): the rerun collects and reports.
    queue.write_text("")
    for name in names:
        dst = os.path.join(out, "runs", name)
        shutil.rmtree(dst)
        shutil.copytree(os.path.join(sweep["out"], "runs", name), dst)
    assert tool.main([*SWEEP, "--out", out, "--launcher", "slurm", "--skip-layer-analysis", *flags]) == 0
    local = json.load(open(os.path.join(sweep["out"], "results.json")))["settings"]
    collected = json.load(open(os.path.join(out, "results.json")))["settings"]
    assert [r["ppl_mean"] for r in collected] == [r["ppl_mean"] for r in local]
    assert len(calls.read_text().splitlines()) == 1  # still one submission


def test_slurm_env_contract_for_mix_k_and_other_positions(sweep):
    from megatron_mixln.research.launch import slurm_env
    from megatron_mixln.research.sweep import build_sweep

    s = build_sweep("pre,mix", None, "7", 3, _flags(sweep["data"]), str(sweep["tmp"] / "y"))
    pre, mix = (slurm_env(s, v, "ARGS", TRAIN_ITERS) for v in s.variants)
    assert pre["NORM_POSITION"] == "pre" and mix["NORM_POSITION"] == "mix"
    assert mix["TRAINER_ARGS_FILE"] == "ARGS" and mix["TRAIN_ITERS"] == str(TRAIN_ITERS)
    assert mix["TRAIN_DATA"] == sweep["data"] + "_train_text_document" and mix["VALID_DATA"] == sweep["data"] + "_valid_text_document"
    assert mix["CKPT"].endswith(os.path.join("y", "runs", s.variants[1].name, "ckpt"))


def test_a_single_sbatch_option_is_taken_as_the_value_of_sbatch_args():
    args, passthrough = tool.parse_args([*SWEEP, "--out", "x", "--launcher", "slurm", "--sbatch-args", "--nodes=1",
                                         "--train-iters", "3"])
    assert args.sbatch_args == "--nodes=1" and passthrough == ["--train-iters", "3"]
