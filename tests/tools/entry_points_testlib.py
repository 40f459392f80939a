"""Every entry point (a `__main__` block under megatron_mixln/, tools/, bench/), run once per bad command line
as a user would, for the exit-code and one-line-error tests of tests/tools (uniquely named: test
directories share sys.path).

Starting an entry point costs seconds (the torch import of most tools), so each process answers both
tests that need a bad flag: `<required flags> --no-such-flag 1 --hel` must exit 2 with one line naming
the unknown flags (test_one_line_errors), which it does only if `--hel` was not expanded to --help
(test_no_abbreviations: argparse's allow_abbrev would print the help and exit 0).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("megatron_mixln", "tools", "bench")
BAD_FLAGS = ["--no-such-flag", "1", "--hel"]  # an unknown flag, then an abbreviation of --help

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


def python_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))


def has_main_block(path: Path) -> bool:
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in ast.parse(path.read_text()).body)


def entry_points() -> list[Path]:
    return [p for p in python_files() if has_main_block(p)]


def tool_name(path: Path) -> str:
    """CASES' key of an entry point: `pretrain` for megatron_mixln/pretrain.py, the stem of a tools/ script."""
    rel = path.relative_to(ROOT)
    return "pretrain" if rel.as_posix() == "megatron_mixln/pretrain.py" else rel.stem if rel.parts[0] == "tools" else ""


def command(path: Path) -> list[str]:
    """How a user starts it: `python -m <module>` for the package's modules, `python <path>` for scripts."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "megatron_mixln":
        return [sys.executable, "-m", ".".join(rel.with_suffix("").parts)]
    return [sys.executable, str(path)]


def run_all(cwd: Path, env: dict) -> dict:
    """{(entry point, "flag")} for every entry point (CASES' required flags + BAD_FLAGS; others BAD_FLAGS alone)
    and {(tool, "file")} for every tool in CASES (its missing-input command line): (exit code, stdout, stderr)."""
    (cwd / "FILE").write_text("a file, not a directory\n")
    missing = str(cwd / "MISSING")
    jobs = {}
    for path in entry_points():
        required = CASES.get(tool_name(path), ([],))[0]
        jobs[(path, "flag")] = command(path) + required + BAD_FLAGS
    for path in entry_points():
        if tool_name(path) in CASES:
            bad_file = CASES[tool_name(path)][1]
            jobs[(tool_name(path), "file")] = command(path) + [
                a.replace("MISSING", missing).replace("FILE", str(cwd / "FILE")) for a in bad_file]

    def run(cmd):
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        return r.returncode, r.stdout, r.stderr

    with ThreadPoolExecutor(4) as pool:
        futures = {key: pool.submit(run, cmd) for key, cmd in jobs.items()}
        return {key: f.result() for key, f in futures.items()}
