"""The planner end to end: the 7B job script's defaults fit 4 x 8 A100-80GB, impossible layouts are
refused with one clear line, and every suggested change really makes a layout fit."""
import os
import shlex
import subprocess
import sys

import pytest

from megatron_mixln.model import ModelConfig
from megatron_mixln.planning import Layout, plan_memory
from megatron_mixln.planning.cli import parse
from megatron_mixln.planning.job_script import read_job_script

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(REPO, "slurm", "pretrain_7b_mixln.sh")
TOOL = os.path.join(REPO, "tools", "estimate_memory.py")


def _tool(*argv):
    """The CLI as a user runs it (one subprocess: slow to start, so used once)."""
    return subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO})


def _main(capsys, monkeypatch, *argv):
    """tools/estimate_memory.py's main in this process -> (exit status, stdout, stderr)."""
    monkeypatch.chdir(REPO)
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import estimate_memory
    finally:
        sys.path.pop(0)
    try:
        code = estimate_memory.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_7b_job_script_defaults_fit_4x8_a100_80gb():
    flags, alloc = read_job_script(SCRIPT)
    # The planner takes the script's own flags (as bash expands them), not a copy of their values.
    model, layout, zero, _ = parse(["--job-script", SCRIPT])
    preset = flags[flags.index("--preset") + 1]
    assert model.hidden_size == ModelConfig.from_preset(preset).hidden_size
    assert layout.micro_batch_size == int(flags[flags.index("--micro-batch-size") + 1])
    assert layout.recompute_activations == ("--recompute-activations" in flags)
    assert (layout.nodes, layout.gpus_per_node) == (alloc["nodes"], alloc["gpus_per_node"])
    ds_config = flags[flags.index("--deepspeed-config") + 1]
    assert os.path.isfile(ds_config) and zero["stage"] == layout.zero_stage
    result = _tool("--job-script", SCRIPT, "--nodes", "4", "--gpus-per-node", "8", "--gpu-memory-gib", "80")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FITS" in result.stdout and "4 nodes x 8 GPUs = 32" in result.stdout


def test_job_script_errors_name_the_script(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "job.sh"
    bad.write_text("#!/bin/bash\n#SBATCH --nodes=2\necho no args array\n")
    code, _, err = _main(capsys, monkeypatch, "--job-script", str(bad))
    assert code == 2 and f"--job-script {bad}: no `args=(`" in err


@pytest.mark.parametrize("argv, message", [
    (["--preset", "7b", "--nodes", "3", "--tensor-model-parallel-size", "3"],
     "num_attention_heads=32 is not divisible by --tensor-model-parallel-size=3"),
    (["--preset", "7b", "--nodes", "8", "--pipeline-model-parallel-size", "64"],
     "num_layers=32 < --pipeline-model-parallel-size=64"),
    (["--preset", "7b", "--gpus-per-node", "6", "--tensor-model-parallel-size", "4"],
     "--tensor-model-parallel-size=4 x --pipeline-model-parallel-size=1 = 4 does not divide the world size 6 "
     "(world size 6 = --nodes 1 x --gpus-per-node 6)"),
    # the trainer's own start-up checks (megatron_mixln.training.startup_checks), not a copy of some of them
    (["--preset", "7b", "--tie-embeddings", "--pipeline-model-parallel-size", "2"],
     "--tie-embeddings with --pipeline-model-parallel-size > 1 is not supported"),
    (["--preset", "7b", "--freeze-pad-embedding", "--tensor-model-parallel-size", "2"],
     "--freeze-pad-embedding works with --tensor-model-parallel-size 1"),
    (["--preset", "7b", "--residual-gate-layers", "1,2", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
     "--residual-gate-layers with --sequence-parallel"),
    (["--preset", "7b", "--global-batch-size", "100", "--micro-batch-size", "8"],
     "--global-batch-size 100 is not divisible by --micro-batch-size 8 x data-parallel size 8 (= 64)"),
    (["--preset", "7b", "--pipeline-model-parallel-size", "2", "--zero-stage", "3"],
     "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only"),
    (["--preset", "7b", "--zero-stage", "2", "--offload-param"], "--offload-param: needs --zero-stage 3"),
    (["--preset", "7b", "--sequence-parallel"], "--sequence-parallel: needs --tensor-model-parallel-size > 1"),
    (["--preset", "7b", "--sequence-parallel", "--tensor-model-parallel-size", "8", "--seq-length", "252"],
     "seq_length=252 is not divisible by --tensor-model-parallel-size=8"),
    (["--preset", "7b", "--deepspeed-config", "ds_configs/zero3.json", "--zero-stage", "2"],
     '"zero_optimization.stage" is 3 but --zero-stage gives 2'),
])
def test_impossible_layouts_are_refused(argv, message, capsys, monkeypatch):
    code, out, err = _main(capsys, monkeypatch, *argv)
    assert code == 2 and message in err, err
    assert out == "" and message in err.strip().splitlines()[-1]  # one line


@pytest.mark.parametrize("argv", [
    ["--preset", "7b", "--bf16", "--zero-stage", "0", "--micro-batch-size", "8"],
    ["--preset", "7b", "--bf16", "--deepspeed-config", "ds_configs/zero3.json", "--nodes", "1", "--gpu-memory-gib",
     "24", "--micro-batch-size", "16"],
    ["--preset", "1b", "--norm-position", "peri", "--bf16", "--zero-stage", "1", "--gpus-per-node", "2",
     "--gpu-memory-gib", "24", "--micro-batch-size", "64"],
])
def test_every_suggestion_fits(argv, capsys, monkeypatch):
    code, out, err = _main(capsys, monkeypatch, *argv)
    assert code == 1 and "DOES NOT FIT" in out, out + err
    line = next(l for l in out.splitlines() if l.startswith("smallest changes that fit"))
    suggestions = line.split(": ", 1)[1].split("; ")
    assert suggestions
    for change in suggestions:
        code, fixed, _ = _main(capsys, monkeypatch, *argv, *shlex.split(change))
        assert code == 0 and "FITS" in fixed, (change, fixed)


def test_pipeline_keeps_one_micro_batch_per_stage_in_flight():
    model = ModelConfig.from_preset("1b", norm_position="mix", post_ln_layers=6)
    one = plan_memory(model, Layout(gpus_per_node=4, micro_batch_size=4, bf16=True))
    pp = plan_memory(model, Layout(gpus_per_node=4, pipeline_model_parallel_size=4, micro_batch_size=4, bf16=True),
                     global_batch_size=64)
    assert pp.in_flight == 4  # the first stage holds pp micro-batches under 1F1B
    # ... of its own quarter of the layers: as many block activations as one GPU without PP.
    assert pp.activations["blocks"] == one.activations["blocks"]
    assert pp.states.gpu < one.states.gpu


def test_job_script_reader_follows_sourced_body_and_environment(tmp_path):
    """A script that keeps its flags in a shared body it sources, with env-var defaults: bash expands
    them as the job would; an environment override shows through."""
    slurm = tmp_path / "slurm"
    slurm.mkdir()
    (slurm / "job.sh").write_text(
        '#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=4\n#SBATCH --gpus-per-node=4\n'
        'PRESET="${PRESET:-1b}"\nexport MICRO_BATCH="${MICRO_BATCH:-4}"\nHOST="$(hostname)"\n'
        'source "$(dirname "$0")/body.sh"\n')
    (slurm / "body.sh").write_text(
        ': "${DS_CONFIG:=ds_configs/zero1.json}"\nargs=(\n    --preset "$PRESET" --micro-batch-size "$MICRO_BATCH"'
        '  # sizes\n    --deepspeed-config "$DS_CONFIG" --bf16 --wandb-name "x y"\n)\nsrun python "${args[@]}"\n')
    flags, alloc = read_job_script(str(slurm / "job.sh"))
    assert alloc == {"nodes": 2, "gpus_per_node": 4}
    assert flags == ["--preset", "1b", "--micro-batch-size", "4", "--deepspeed-config",
                     str(tmp_path / "ds_configs" / "zero1.json"), "--bf16", "--wandb-name", "x y"]
    flags, _ = read_job_script(str(slurm / "job.sh"), environ={"PRESET": "350m", "DS_CONFIG": "/abs/z.json"})
    assert flags[:2] == ["--preset", "350m"] and flags[5] == "/abs/z.json"
