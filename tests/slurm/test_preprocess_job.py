"""slurm/preprocess.sh on the private Slurm: the job array tokenizes the parts, the dependent job
merges them, the result equals one preprocess_c4.py run byte for byte, and a rerun redoes nothing."""
import json
import os
import subprocess
import sys

from slurm_testlib import REPO, job_env


def _corpus(directory) -> list[str]:
    os.makedirs(directory)
    paths = []
    for f in range(5):
        path = os.path.join(directory, f"c4-train.{f:05d}-of-00005.jsonl")
        with open(path, "w") as fh:
            for d in range(40 + f):
                fh.write(json.dumps({"text": " ".join(str((f * 7 + d * 13 + k) % 997) for k in range(1 + d % 23))}) + "\n")
        paths.append(path)
    return paths


def test_array_then_merge_equals_one_process(slurm_cluster, tmp_path):
    _corpus(str(tmp_path / "corpus"))
    pattern = str(tmp_path / "corpus" / "c4-train.*.jsonl")
    one = str(tmp_path / "one")
    subprocess.run([sys.executable, f"{REPO}/tools/preprocess_c4.py", "--input", pattern, "--tokenizer",
                    "null:1000", "--append-eod", "--output-prefix", one, "--workers", "1", "--no-progress"],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=REPO))
    env = job_env("unused", "unused", ROOT=REPO, INPUT=pattern, TOKENIZER="null:1000", NUM_SHARDS="3",
                  OUTPUT_PREFIX=str(tmp_path / "multi"), PREPROCESS_ARGS="--append-eod")
    options = ["--cpus-per-task=1", "--time=5", f"--output={tmp_path}/pp-%j.out"]

    def submit() -> list[str]:
        out = slurm_cluster.run("bash", "slurm/preprocess.sh", *options, env=env).stdout
        words = out.split()
        return [words[words.index("array") + 2], words[words.index("merge") + 2]]

    array, merge = submit()
    info = slurm_cluster.wait(merge, timeout=240)
    logs = "".join(open(os.path.join(tmp_path, n)).read() for n in os.listdir(tmp_path) if n.startswith("pp-"))
    assert info["JobState"] == "COMPLETED", logs
    for ext in ("bin", "idx"):
        with open(f"{one}_text_document.{ext}", "rb") as a, open(f"{tmp_path}/multi_text_document.{ext}", "rb") as b:
            assert a.read() == b.read()
    with open(f"{tmp_path}/multi_text_document.summary.json") as fh:
        assert [p["partition"]["shard_index"] for p in json.load(fh)["parts"]] == [0, 1, 2]
    merged_at = os.path.getmtime(f"{tmp_path}/multi_text_document.bin")
    array, merge = submit()  # resumable: a rerun finds every part and the merge done
    assert slurm_cluster.wait(merge, timeout=240)["JobState"] == "COMPLETED"
    assert os.path.getmtime(f"{tmp_path}/multi_text_document.bin") == merged_at
    logs = "".join(open(os.path.join(tmp_path, n)).read() for n in os.listdir(tmp_path) if n.startswith("pp-"))
    assert logs.count("done already") == 3 and "merged already" in logs


def test_bad_num_shards_fails_before_submitting(slurm_cluster, tmp_path):
    _corpus(str(tmp_path / "corpus"))
    env = job_env("unused", "unused", ROOT=REPO, INPUT=str(tmp_path / "corpus" / "*.jsonl"), TOKENIZER="null:1000",
                  NUM_SHARDS="9", OUTPUT_PREFIX=str(tmp_path / "multi"))
    proc = slurm_cluster.run("bash", "slurm/preprocess.sh", env=env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "preprocess.sh: --num-shards 9: only 5 input files to partition; use at most 5"
