"""Every entry point fails the same way (megatron_mixln.errors, docs/errors.md): bad input prints ONE line
`<tool>: error: ...` naming the flag or file, and exits 2.

Each script with a `__main__` block under tools/, and `python -m megatron_mixln.pretrain`, is run as a user
would with an unknown flag and with an input file that does not exist. The scripts are found by parsing
tools/, so a new tool fails this test until it is listed here.
"""
import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = [sys.executable, "-m", "megatron_mixln.pretrain"]

# tool -> (its required flags, flags with an input path that does not exist (MISSING), what the line must name)
CASES = {
    "pretrain": (["--train-iters", "1"], ["--data-path", "MISSING/train", "--tokenizer", "null:100"], "--data-path"),
    "analyze_layers": (["--checkpoint", ".", "--out", "o"], ["--checkpoint", "MISSING", "--out", "o"], "--checkpoint"),
    "compare_norms": (["--positions", "pre", "--out", "o"],
                      ["--positions", "pre", "--out", "o", "--data-path", "MISSING/train", "--tokenizer", "null:100",
                       "--train-iters", "1"], "--data-path"),
    "convert_checkpoint": (["--input", ".", "--output", "o"], ["--input", "MISSING", "--output", "o"], "--input"),
    "convert_from_hf": (["--hf", ".", "--output", "o"], ["--hf", "MISSING", "--output", "o"], "--hf"),
    "convert_to_hf": (["--checkpoint", ".", "--output", "o"], ["--checkpoint", "MISSING", "--output", "o"],
                      "--checkpoint"),
    "gen_flag_docs": ([], ["--output", "MISSING/flags.md"], "MISSING/flags.md"),  # writes it: a missing directory
    "estimate_memory": ([], ["--deepspeed-config", "MISSING/ds.json"], "--deepspeed-config"),
    "make_sample_corpus": (["--output-dir", "o"], ["--output-dir", "FILE/sub"], "FILE/sub"),  # no input file: an output under a file
    "merge_datasets": (["--input", "x", "--output-prefix", "o"], ["--input", "MISSING/part", "--output-prefix", "o"],
                       "MISSING/part"),
    "model_summary": ([], ["--num-layers", "0"], "--num-layers"),  # no input file: a bad value, named as its flag
    "plot_metrics": (["o", "--out", "o"], ["MISSING", "--out", "o"], "MISSING"),
    "preprocess_c4": (["--tokenizer", "null:100", "--output-prefix", "o"],
                      ["--input", "MISSING/a.jsonl", "--tokenizer", "null:100", "--output-prefix", "o"], "--input"),
    "stability_sweep": ([str(ROOT / "configs/paper/mixln_stability_cpu.yaml"), "--out", "o"],
                        ["MISSING/s.yaml", "--out", "o"], "MISSING/s.yaml"),
    "train_tokenizer": (["--input", "x", "--output-prefix", "o"], ["--input", "MISSING/a.txt", "--output-prefix", "o"],
                        "--input"),
}


def _tools():
    return sorted(p.stem for p in (ROOT / "tools").glob("*.py")
                  if any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in ast.parse(p.read_text()).body))


def _run(tool, args, cwd):
    cmd = PRETRAIN if tool == "pretrain" else [sys.executable, str(ROOT / "tools" / f"{tool}.py")]
    r = subprocess.run(cmd + args, cwd=cwd, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr


def test_every_tool_is_covered():
    assert sorted(set(CASES) - {"pretrain"}) == _tools()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("exit_codes")
    (cwd / "FILE").write_text("a file, not a directory\n")
    missing = str(cwd / "MISSING")
    jobs = {}
    for tool, (required, bad_file, _) in CASES.items():
        jobs[(tool, "flag")] = required + ["--no-such-flag", "1"]
        jobs[(tool, "file")] = [a.replace("MISSING", missing).replace("FILE", str(cwd / "FILE")) for a in bad_file]
    with ThreadPoolExecutor(4) as pool:
        futures = {key: pool.submit(_run, key[0], args, cwd) for key, args in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


@pytest.mark.parametrize("tool", sorted(CASES))
def test_unknown_flag_is_one_line_and_exit_2(results, tool):
    code, err = results[(tool, "flag")]
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{tool}: error: ") and "unrecognized arguments: --no-such-flag" in err, err


@pytest.mark.parametrize("tool", sorted(CASES))
def test_missing_input_is_one_line_naming_it_and_exit_2(results, tool):
    code, err = results[(tool, "file")]
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{tool}: error: ") and CASES[tool][2] in err, err
