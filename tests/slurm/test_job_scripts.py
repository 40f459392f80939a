"""The paper's job scripts against a real slurmctld: `sbatch --test-only` accepts each as written;
run for real with DRY_RUN=1 each passes the paper's recipe (docs/paper.md#training-recipe) to the trainer, whose
parser accepts it; bad data or tokenizer paths fail in the first seconds with one line; an unreachable
rendezvous ends every rank with one line naming the address and port instead of hanging."""
import os
import re
import shlex
import time

import pytest

from slurm_testlib import job_env, job_output, two_node_options

from megatron_mixln.model import PAPER_POST_LN_LAYERS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The paper's table (lr, steps, warm-up); 350m is not in it: the script documents its choice.
PAPER = {"71m": ("1e-3", 10000, 1000), "130m": ("1e-3", 20000, 2000), "250m": ("1e-3", 40000, 4000),
         "1b": ("5e-4", 100000, 1000), "7b": ("5e-4", 150000, 15000)}
NODES = {"71m": 1, "130m": 1, "250m": 1, "350m": 1, "1b": 2, "7b": 4}
SIZES = list(NODES)


def _script(size):
    return f"slurm/pretrain_{size}_mixln.sh"


def test_sbatch_test_only_accepts_every_paper_script(slurm_cluster, tiny_data, tmp_path):
    env = job_env(tiny_data, str(tmp_path / "ckpt"))
    for size in SIZES:
        proc = slurm_cluster.run("sbatch", "--test-only", _script(size), env=env, check=False)
        assert proc.returncode == 0, (size, proc.stdout, proc.stderr)
        # 8 tasks x 12 CPUs per node, on the script's node count
        match = re.search(r"to start at \S+ using (\d+) processors on nodes (\S+)", proc.stderr)
        assert match, (size, proc.stderr)
        assert int(match.group(1)) == NODES[size] * 8 * 12, (size, proc.stderr)


def test_paper_scripts_pass_the_paper_recipe(slurm_cluster, tiny_data, tmp_path):
    from megatron_mixln.training.arguments import parse_configs

    env = job_env(tiny_data, str(tmp_path / "ckpt"), DRY_RUN=1)
    for key in ("PRESET", "POST_LN_LAYERS", "TRAIN_ITERS", "WARMUP_ITERS", "LR", "MICRO_BATCH", "GLOBAL_BATCH",
                "SEQ_LENGTH", "DS_CONFIG", "BF16", "RECOMPUTE", "EXTRA_ARGS", "CKPT"):
        env.pop(key)  # the scripts' own defaults
    jobs = {size: slurm_cluster.sbatch(_script(size), f"--output={tmp_path}/{size}-%j.out", env=env) for size in SIZES}
    for size, job in jobs.items():
        info = slurm_cluster.wait(job, timeout=120)
        out = job_output(str(tmp_path), size, job)
        assert info["JobState"] == "COMPLETED", (size, out)
        assert int(info["NumNodes"]) == NODES[size]
        line = [ln for ln in out.splitlines() if ln.startswith("dry run: ")]
        assert len(line) == 1, out
        argv = shlex.split(line[0][len("dry run: "):])[3:]  # drop `python -m megatron_mixln.pretrain`
        model, cfg = parse_configs(argv)
        assert model.seq_length == 256 and cfg.global_batch_size == 512 and cfg.optimizer == "adam"
        assert cfg.weight_decay == 0 and cfg.lr_decay_style == "cosine" and cfg.min_lr == pytest.approx(0.1 * cfg.lr)
        assert cfg.bf16
        assert cfg.global_batch_size % (cfg.micro_batch_size * NODES[size] * 8) == 0  # micro x GPUs x accumulation
        positions = list(model.positions)
        k = PAPER_POST_LN_LAYERS.get(size, 6)  # 350m: 24 layers like 250m and 1b -> their 6
        assert positions[:k] == ["post"] * k and set(positions[k:]) == {"pre"}, (size, positions)
        if size in PAPER:
            lr, steps, warmup = PAPER[size]
            assert (cfg.lr, cfg.train_iters, cfg.lr_warmup_iters) == (float(lr), steps, warmup), size
        # the script and configs/paper/<size>.yaml are one recipe
        _, paper = parse_configs(["--config", os.path.join(REPO, "configs", "paper", f"{size}.yaml")])
        for name in ("lr", "min_lr", "train_iters", "lr_warmup_iters", "global_batch_size", "optimizer", "weight_decay"):
            assert getattr(cfg, name) == getattr(paper, name), (size, name, getattr(cfg, name), getattr(paper, name))
        assert cfg.save.endswith(f"/checkpoints/{size}-mix"), cfg.save
        assert ("--recompute-activations" in argv) == (size == "7b")


@pytest.mark.parametrize("what", ["DATA", "TOKENIZER"])
def test_missing_data_or_tokenizer_fails_in_seconds_with_one_line(slurm_cluster, tiny_data, tmp_path, what):
    overrides = {"DATA": str(tmp_path / "nowhere" / "c4")} if what == "DATA" else {"TOKENIZER": str(tmp_path / "t5.model")}
    env = job_env(tiny_data, str(tmp_path / "ckpt"), **overrides)
    job = slurm_cluster.sbatch("slurm/pretrain_7b_mixln.sh", *two_node_options(str(tmp_path), "bad"), env=env)
    info = slurm_cluster.wait(job, timeout=60)
    out = job_output(str(tmp_path), "bad", job).strip()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert info["RunTime"] <= "00:00:03", info
    assert len(out.splitlines()) == 1, out  # one line, before any launch or rendezvous
    expected = f"error: DATA: {tmp_path}/nowhere/c4_train_text_document.bin does not exist" if what == "DATA" \
        else f"error: TOKENIZER={tmp_path}/t5.model does not exist"
    assert out.startswith(f"{info['JobName']}: {expected}"), out  # the entry point's name first (docs/errors.md)


def test_unreachable_rendezvous_fails_every_rank_with_one_line(slurm_cluster, tiny_data, tmp_path):
    # The old script's MASTER_ADDR: the node *name*, which resolves nowhere on this cluster.
    env = job_env(tiny_data, str(tmp_path / "ckpt"), MASTER_ADDR="n1", MASTER_PORT="29555", DIST_TIMEOUT_MINUTES="0.1")
    start = time.time()
    job = slurm_cluster.sbatch("slurm/pretrain_7b_mixln.sh", *two_node_options(str(tmp_path), "rdv"), env=env)
    info = slurm_cluster.wait(job, timeout=120)
    out = job_output(str(tmp_path), "rdv", job)
    assert info["JobState"] == "FAILED", out
    lines = [ln for ln in out.splitlines() if "rendezvous with MASTER_ADDR=n1 MASTER_PORT=29555 failed within 0.1 min" in ln]
    assert len(lines) == 2, out  # one per rank
    assert {ln.split("error:")[0].strip() for ln in lines} == {"pretrain:", "[rank 1] pretrain:"}, lines
    assert time.time() - start < 100
    assert "error: the trainers failed (status " in out
