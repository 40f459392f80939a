"""bench/gpu_suite.sh without a GPU: syntax, the --dry-run plan, and every command line it would run
checked by the parsers that will read it (so a renamed flag fails here, not on a lent GPU)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.sh"


def dry_run():
    proc = subprocess.run(["bash", str(SUITE), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OUT_DIR": "/tmp/gpu_suite_out", "VENV": sys.prefix})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def command_args(text, marker):
    """The arguments after `marker` on the dry run's line that runs it, with $VARS filled in."""
    line = next(l for l in text.splitlines() if marker in l)
    line = line.rstrip(";").replace('"$OUT_DIR', '"/tmp/gpu_suite_out').replace('"${data}', '"/tmp/gpu_suite_out/7b_data')
    line = line.replace('"$SEVEN_B_STEPS"', "3").replace('"$cfg"', "ds_configs/zero3_offload.json")
    words = shlex.split(line)
    return words[words.index(marker) + 1:]


def test_syntax_and_usage_error():
    assert subprocess.run(["bash", "-n", str(SUITE)]).returncode == 0
    bad = subprocess.run(["bash", str(SUITE), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--dry-run" in bad.stderr


def test_dry_run_lists_every_step_within_eight_minutes_and_runs_nothing(tmp_path):
    out = dry_run()
    steps = re.findall(r"^== (\S+) \(limit (\d+)s\)", out, re.M)
    assert [s for s, _ in steps] == ["setup", "cuda_tests", "kernels", "throughput", "7b_smoke"]
    assert sum(int(b) for _, b in steps) <= 8 * 60
    assert "launchers/setup_env.sh" in out and "bench/norm_kernels.py --quick" in out
    assert not Path("/tmp/gpu_suite_out/results.md").exists()


def test_throughput_command_parses():
    sys.path.insert(0, str(ROOT / "bench"))
    import throughput

    args = throughput.parse_args(command_args(dry_run(), "bench/throughput.py"))
    assert args.presets == ["130m", "350m", "1b"] and args.dtype == ["bf16"] and args.compile == ["on"]


def test_7b_smoke_uses_the_slurm_jobs_settings_and_parses():
    from megatron_mixln.training.arguments import parse_configs

    argv = command_args(dry_run(), "megatron_mixln.pretrain")
    model, train = parse_configs(argv)
    assert model.positions == ("post",) * 2 + ("pre",) * 30 and model.hidden_size == 4096
    from megatron_mixln.planning.job_script import read_job_script

    job_argv, _ = read_job_script(str(ROOT / "slurm" / "pretrain_7b_mixln.sh"))  # as bash expands it
    job, smoke = " ".join(job_argv), " ".join(argv)
    for flag in ("--preset 7b", "--norm-position mix", "--post-ln-layers 2", "--seq-length 256",
                 "--micro-batch-size 8", "--optimizer adam --lr 5e-4", "--lr-decay-style cosine",
                 "--clip-grad 1.0", "--bf16", "--recompute-activations"):
        assert flag in job and flag in smoke, flag
    warmup, iters = (int(job_argv[job_argv.index(f) + 1]) for f in ("--lr-warmup-iters", "--train-iters"))
    assert "--lr-warmup-fraction 0.1" in smoke and warmup / iters == 0.1
    assert train.deepspeed_config == "ds_configs/zero3_offload.json" and train.torch_adam is True
    from megatron_mixln.training.ds_config import build_ds_config, optimizer_offloaded, zero_stage_of

    ds = build_ds_config(train, global_batch_size=8, gradient_accumulation_steps=1, hidden_size=model.hidden_size)
    assert zero_stage_of(ds) == 3 and optimizer_offloaded(ds) and ds["zero_force_ds_cpu_optimizer"] is False


def test_7b_data_snippet_writes_a_readable_dataset(tmp_path):
    """The smoke run's random-token corpus, written by the suite's own snippet and read back."""
    text = SUITE.read_text()
    snippet = text.split("\"$PY\" - \"$data\" <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    prefix = tmp_path / "d"
    subprocess.run([sys.executable, "-c", snippet, str(prefix)], check=True, cwd=ROOT, timeout=120)
    from megatron_mixln.data.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix) + "_text_document")
    assert len(ds) == 512 and int(max(ds[0])) < 32000


def test_refuses_to_run_without_a_gpu_before_installing_anything(tmp_path):
    if subprocess.run(["bash", "-c", "nvidia-smi -L"], capture_output=True).returncode == 0:
        pytest.skip("a GPU is present")
    proc = subprocess.run(["bash", str(SUITE)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OUT_DIR": str(tmp_path / "out"), "VENV": str(tmp_path / "venv")})
    assert proc.returncode == 1 and "no NVIDIA GPU" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "venv").exists()
