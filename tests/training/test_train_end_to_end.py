"""The real path: sample corpus -> tokenizer -> indexed binaries -> pretrain. The loss falls, the
metrics file has per-layer gradient norms for every layer, and the launchers start working jobs."""
import json
import math
import os
import shutil
import subprocess

import pytest

from training_testlib import PYTHON, REPO, entry_env

MODEL = ["--hidden-size", "64", "--ffn-hidden-size", "172", "--num-layers", "4", "--num-attention-heads", "4",
         "--seq-length", "64", "--norm-position", "mix", "--post-ln-layers", "1"]


def _tool(*args):
    subprocess.run([PYTHON, *args], cwd=REPO, env=entry_env(), check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    _tool("tools/make_sample_corpus.py", "--output-dir", str(d / "c4"), "--target-mb", "1")
    _tool("tools/train_tokenizer.py", "--input", str(d / "c4" / "c4-train.*.json.gz"), "--output-prefix",
          str(d / "spm"), "--vocab-size", "1000")
    for split, name in (("train", "train"), ("validation", "valid")):
        _tool("tools/preprocess_c4.py", "--input", str(d / "c4" / f"c4-{split}.*.json.gz"), "--tokenizer",
              str(d / "spm.model"), "--output-prefix", str(d / name), "--append-eod", "--workers", "1", "--no-progress")
    return {"tokenizer": str(d / "spm.model"), "train": str(d / "train_text_document"),
            "valid": str(d / "valid_text_document")}


def _data_args(corpus):
    return ["--tokenizer", corpus["tokenizer"], "--data-path", corpus["train"], "--valid-data-path", corpus["valid"]]


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["kind"] == kind]


@pytest.mark.slow
def test_loss_falls_on_the_sample_corpus(corpus, tmp_path):
    run = str(tmp_path / "run")
    cmd = [PYTHON, "-m", "megatron_mixln.pretrain", *_data_args(corpus), *MODEL, "--micro-batch-size", "8",
           "--train-iters", "40", "--lr", "3e-3", "--lr-warmup-iters", "4", "--eval-interval", "20",
           "--eval-iters", "4", "--log-interval", "1", "--grad-norm-interval", "10", "--run-dir", run,
           "--zero-stage", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=entry_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = [r["loss"] for r in _records(run, "train")]
    assert len(losses) == 40 and abs(losses[0] - math.log(1024)) < 0.5  # starts near uniform over the vocab
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    valid = _records(run, "valid")
    assert [r["step"] for r in valid] == [20, 40] and valid[1]["valid_ppl"] < valid[0]["valid_ppl"] < 1024
    grads = _records(run, "grad_norms")
    assert [r["step"] for r in grads] == [10, 20, 30, 40]
    for rec in grads:
        for layer in range(1, 5):
            for sub in ("attn", "mlp", "attn_norm", "mlp_norm"):
                value = rec[f"grad_norm/layer_{layer:02d}/{sub}"]
                assert math.isfinite(value) and value > 0
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["positions"] == "post,pre*3" and config["model"]["vocab_size"] == 1024  # 1000 padded to 128s


def _netns_ok():
    return shutil.which("unshare") and subprocess.run(
        ["unshare", "-n", "bash", "-c", "ip link set lo up"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _netns_ok(), reason="needs `unshare -n` (root) to keep the launcher's store off the network")
@pytest.mark.parametrize("launcher", ["torchrun_pretrain.sh", "deepspeed_pretrain.sh"])
def test_launchers_run_two_processes(corpus, tmp_path, launcher):
    """The launcher scripts start a 2-process ZeRO-2 job; it matches a 1-process run of the same batch."""
    common = [*_data_args(corpus), *MODEL, "--micro-batch-size", "2", "--global-batch-size", "4",
              "--train-iters", "3", "--eval-iters", "1", "--log-interval", "1", "--zero-stage", "2"]
    single = str(tmp_path / "single")
    subprocess.run([PYTHON, "-m", "megatron_mixln.pretrain", *common, "--run-dir", single], cwd=REPO,
                   env=entry_env(), check=True, capture_output=True, timeout=300)
    double = str(tmp_path / "double")
    env = dict(entry_env(), NPROC_PER_NODE="2", NUM_GPUS="2", MASTER_PORT="29517")
    script = " ".join([os.path.join(REPO, "launchers", launcher), *common, "--run-dir", double])
    proc = subprocess.run(["unshare", "-n", "bash", "-c", f"ip link set lo up && {script}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.load(open(os.path.join(double, "config.json")))["world_size"] == 2
    for a, b in zip(_records(double, "train"), _records(single, "train"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert _records(double, "valid")[-1]["valid_ppl"] == pytest.approx(_records(single, "valid")[-1]["valid_ppl"], rel=1e-5)
